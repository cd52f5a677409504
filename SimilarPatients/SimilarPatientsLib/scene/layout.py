"""The side-by-side view of a query and its matches: one slice view each, each centred on its own tumor,
zoom and window/level linked across the views but not position (each patient has its own frame).

Slicer's own slice linking would also link position, so the links here are observers of their own. Zoom
is linked as millimetres per screen pixel, not as a field of view: views of different widths (a row of three
beside a row of two) then show the same scale with square pixels. Each view's field of view follows its own
shape, as Slicer's ``FitFOVToBackground`` does (the given size across the view's shorter side).
Plain MRML: a layout description registered on the layout node (replaced when the comparison is shown again
with another number of matches), slice and composite nodes found (or, as Slicer's views do, created) by
layout name. Works on Slicer's scene and on ``slicer-core``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SimilarPatientsError

#: The layout id registered for the comparison (Slicer's built-in layouts use small numbers).
LAYOUT_ID = 53_200
MAX_MATCHES = 8
QUERY_VIEW = "SimilarQuery"


@dataclass
class Pane:
    """One view's content: the volume node, the tumor centre (RAS mm, Slicer's world) and its label."""

    volume: object
    centre_ras: Sequence[float]
    label: str


def view_names(matches: int) -> list[str]:
    """The layout names of the query's view and of ``matches`` match views."""
    return [QUERY_VIEW] + [f"SimilarMatch{i}" for i in range(1, matches + 1)]


def layout_description(matches: int) -> str:
    """A grid of slice views, the query's first, then the matches row by row (1 → 1×2, 4 → 2×3, 8 → 3×3)."""
    if not 1 <= matches <= MAX_MATCHES:
        raise SimilarPatientsError(f"Show 1 to {MAX_MATCHES} matches beside the query, not {matches}.")
    names = view_names(matches)
    columns = math.ceil(math.sqrt(len(names)))
    rows = [names[i : i + columns] for i in range(0, len(names), columns)]

    def view(name: str, label: str) -> str:
        return (
            f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
            f'<property name="orientation" action="default">Axial</property>'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewcolor" action="default">{"#E2C044" if name == QUERY_VIEW else "#8C8C8C"}</property>'
            f"</view></item>"
        )

    items = "".join(
        '<item><layout type="horizontal">'
        + "".join(view(name, "Q" if name == QUERY_VIEW else name[len("SimilarMatch") :]) for name in row)
        + "</layout></item>"
        for row in rows
    )
    return f'<layout type="vertical">{items}</layout>'


class Comparison:
    """The views of one comparison and the links between them; :meth:`remove` ends the links."""

    def __init__(self, scene, slice_nodes: list, display_nodes: list):
        self.scene = scene
        self.slice_nodes = slice_nodes
        self.display_nodes = display_nodes
        self._observations: list = []
        self._syncing = False
        for node in slice_nodes:
            self._observations.append((node, node.AddObserver("ModifiedEvent", self._zoom_changed)))
        for node in display_nodes:
            self._observations.append((node, node.AddObserver("ModifiedEvent", self._window_changed)))

    def remove(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    def _zoom_changed(self, changed, _event) -> None:
        if self._syncing:
            return
        scale = mm_per_pixel(changed)
        self._syncing = True
        try:
            for node in self.slice_nodes:
                if node is not changed and not math.isclose(mm_per_pixel(node), scale, rel_tol=1e-9):
                    set_scale(node, scale)
        finally:
            self._syncing = False

    def _window_changed(self, changed, _event) -> None:
        if self._syncing:
            return
        window, level = changed.GetWindow(), changed.GetLevel()
        self._syncing = True
        try:
            for node in self.display_nodes:
                if node is not changed and (node.GetWindow(), node.GetLevel()) != (window, level):
                    node.SetAutoWindowLevel(False)
                    node.SetWindowLevel(window, level)
        finally:
            self._syncing = False


def show(scene, layout_node, query: Pane, matches: Sequence[Pane], field_of_view_mm: float = 120.0) -> Comparison:
    """Switch ``layout_node`` to the query and its matches side by side, each view showing its volume,
    centred on its tumor and named after its label, all at the same zoom; zoom and window/level stay linked."""
    names = view_names(len(matches))
    description = layout_description(len(matches))
    if layout_node.IsLayoutDescription(LAYOUT_ID):  # shown before, perhaps with another number of matches
        layout_node.SetLayoutDescription(LAYOUT_ID, description)
    elif not layout_node.AddLayoutDescription(LAYOUT_ID, description):
        raise SimilarPatientsError(f"The layout {LAYOUT_ID} could not be registered on the layout node.")
    layout_node.SetViewArrangement(LAYOUT_ID)
    slice_nodes, display_nodes = [], []
    for name, pane in zip(names, [query, *matches]):
        slice_node = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
        if slice_node is None:
            raise SimilarPatientsError(
                f"The view '{name}' was not created for the layout; is the layout logic attached to the scene?"
            )
        _composite(scene, name).SetBackgroundVolumeID(pane.volume.GetID())
        slice_node.SetOrientation("Axial")
        fit_field_of_view(slice_node, field_of_view_mm)
        slice_node.JumpSliceByCentering(*[float(v) for v in pane.centre_ras])
        slice_node.SetLayoutLabel("Q" if name == QUERY_VIEW else name[len("SimilarMatch") :])
        pane.volume.SetName(pane.label)
        slice_nodes.append(slice_node)
        if pane.volume.GetDisplayNode() is None:
            pane.volume.CreateDefaultDisplayNodes()
        display_nodes.append(pane.volume.GetDisplayNode())
    return Comparison(scene, slice_nodes, display_nodes)


def fit_field_of_view(slice_node, field_of_view_mm: float) -> None:
    """``field_of_view_mm`` across the view's shorter side, the longer side in proportion (square pixels)."""
    width, height = _dimensions(slice_node)
    if width < height:
        horizontal, vertical = field_of_view_mm, field_of_view_mm * height / width
    else:
        horizontal, vertical = field_of_view_mm * width / height, field_of_view_mm
    slice_node.SetFieldOfView(horizontal, vertical, slice_node.GetFieldOfView()[2])


def mm_per_pixel(slice_node) -> float:
    """The view's zoom: millimetres per screen pixel, vertically (Slicer keeps the height when a view resizes)."""
    return slice_node.GetFieldOfView()[1] / _dimensions(slice_node)[1]


def set_scale(slice_node, scale: float) -> None:
    """Zoom the view to ``scale`` mm per pixel, its field of view in its own proportions."""
    width, height = _dimensions(slice_node)
    slice_node.SetFieldOfView(scale * width, scale * height, slice_node.GetFieldOfView()[2])


def _dimensions(slice_node) -> tuple:
    width, height, _ = slice_node.GetDimensions()
    return max(int(width), 1), max(int(height), 1)


def _composite(scene, layout_name: str):
    """The composite node of a view (which volumes it shows): Slicer's view makes it; without one (outside
    Slicer's application) it is made here the same way."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == layout_name:
            return node
    node = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
    node.SetLayoutName(layout_name)
    node.SetSingletonTag(layout_name)
    scene.AddNode(node)
    return node
