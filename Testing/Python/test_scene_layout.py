"""The side-by-side layout on a real MRML scene (slicer-core): views for 1, 4 and 8 matches with their
labels, each centred on its own tumor, zoom and window/level linked, position not."""

from __future__ import annotations

import numpy as np
import pytest
from SimilarPatientsLib import SimilarPatientsError
from SimilarPatientsLib.scene import layout


def _volume(scene, name, origin):
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 40)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 1.5)
    node.SetOrigin(*origin)
    node.CreateDefaultDisplayNodes()
    return node


def _panes(scene, count):
    rng = np.random.default_rng(count)
    panes = []
    for i in range(count + 1):
        origin = rng.uniform(-200, 200, 3)
        centre = origin + np.array([25.6, 25.6, 30.0]) + rng.uniform(-5, 5, 3)
        label = "Query" if i == 0 else f"#{i} P{i:03d} (closer than {100 - i}% of nearest matches)"
        panes.append(layout.Pane(_volume(scene, f"v{i}", origin), centre, label))
    return panes


@pytest.mark.parametrize(("count", "grid"), [(1, (1, 2)), (4, (2, 3)), (8, (3, 3))])
def test_one_view_per_match_each_centred_on_its_tumor(scene, count, grid):
    panes = _panes(scene, count)
    layout.show(scene, scene.layout_logic.GetLayoutNode(), panes[0], panes[1:])
    views = scene.layout_logic.GetViewNodes()
    names = [views.GetItemAsObject(i).GetLayoutName() for i in range(views.GetNumberOfItems())]
    assert names == layout.view_names(count)
    description = layout.layout_description(count)
    assert description.count('<layout type="horizontal">') == grid[0]
    for name, pane in zip(names, panes):
        slice_node = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
        centre = [slice_node.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
        assert np.allclose(centre, pane.centre_ras, atol=0.8)  # within a voxel of the tumor's centre
        assert slice_node.GetOrientation() == "Axial"
        composite = next(
            scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
            if scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").GetLayoutName() == name
        )
        assert composite.GetBackgroundVolumeID() == pane.volume.GetID()
        assert pane.volume.GetName() == pane.label
    labels = [scene.GetSingletonNode(n, "vtkMRMLSliceNode").GetLayoutLabel() for n in names]
    assert labels == ["Q", *[str(i) for i in range(1, count + 1)]]


def test_zoom_and_window_level_are_linked_position_is_not(scene):
    panes = _panes(scene, 4)
    comparison = layout.show(scene, scene.layout_logic.GetLayoutNode(), panes[0], panes[1:])
    first, *others = comparison.slice_nodes
    positions = [[n.GetSliceToRAS().GetElement(r, 3) for r in range(3)] for n in others]
    first.SetFieldOfView(60.0, 60.0, first.GetFieldOfView()[2])
    first.JumpSliceByCentering(0.0, 0.0, 0.0)  # moving the query's view moves no other view
    for node, position in zip(others, positions):
        assert tuple(node.GetFieldOfView()[:2]) == (60.0, 60.0)
        assert [node.GetSliceToRAS().GetElement(r, 3) for r in range(3)] == position
    comparison.display_nodes[2].SetAutoWindowLevel(False)
    comparison.display_nodes[2].SetWindowLevel(400.0, 40.0)
    assert all((d.GetWindow(), d.GetLevel()) == (400.0, 40.0) for d in comparison.display_nodes)
    comparison.remove()
    first.SetFieldOfView(90.0, 90.0, first.GetFieldOfView()[2])
    assert tuple(others[0].GetFieldOfView()[:2]) == (60.0, 60.0)  # unlinked after remove()


def test_more_matches_than_views_are_refused():
    with pytest.raises(SimilarPatientsError, match="Show 1 to 8 matches"):
        layout.layout_description(9)


def test_showing_again_with_another_number_of_matches_shows_exactly_the_new_ones(scene):
    """2 matches, then 4, 8 and 2 again: each time the layout holds the new views only, each showing its new
    volume with its new label (the layout id registered the first time is replaced, not kept)."""
    layout_node = scene.layout_logic.GetLayoutNode()
    for count in (2, 4, 8, 2):
        panes = _panes(scene, count)
        layout.show(scene, layout_node, panes[0], panes[1:])
        assert layout_node.GetLayoutDescription(layout.LAYOUT_ID) == layout.layout_description(count)
        assert layout_node.GetViewArrangement() == layout.LAYOUT_ID
        views = scene.layout_logic.GetViewNodes()
        names = [views.GetItemAsObject(i).GetLayoutName() for i in range(views.GetNumberOfItems())]
        assert names == layout.view_names(count)
        for name, pane in zip(names, panes):
            composite = next(
                scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
                if scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").GetLayoutName() == name
            )
            assert composite.GetBackgroundVolumeID() == pane.volume.GetID(), (count, name)
            assert pane.volume.GetName() == pane.label


def test_views_of_any_shape_keep_square_pixels_and_share_one_zoom(scene):
    """A 600 x 300 query view beside narrower and taller match views: each field of view has its view's
    proportions (120 mm across the shorter side), and zooming one view gives every view the same mm per
    pixel, each in its own proportions, never stretched."""
    layout_node = scene.layout_logic.GetLayoutNode()
    panes = _panes(scene, 4)
    layout.show(scene, layout_node, panes[0], panes[1:]).remove()  # the views exist; their links end
    shapes = {"SimilarQuery": (600, 300), "SimilarMatch1": (400, 300), "SimilarMatch2": (300, 500)}
    for name, (width, height) in shapes.items():
        scene.GetSingletonNode(name, "vtkMRMLSliceNode").SetDimensions(width, height, 1)
    comparison = layout.show(scene, layout_node, panes[0], panes[1:])
    for node in comparison.slice_nodes:
        width, height, _ = node.GetDimensions()
        horizontal, vertical, _ = node.GetFieldOfView()
        assert horizontal / vertical == pytest.approx(width / height)  # square pixels
        assert min(horizontal, vertical) == pytest.approx(120.0)
    query = comparison.slice_nodes[0]
    query.SetFieldOfView(150.0, 75.0, query.GetFieldOfView()[2])  # zoomed out, 0.25 mm per pixel
    for node in comparison.slice_nodes:
        width, height, _ = node.GetDimensions()
        horizontal, vertical, _ = node.GetFieldOfView()
        assert (horizontal / width, vertical / height) == pytest.approx((0.25, 0.25)), node.GetLayoutName()
