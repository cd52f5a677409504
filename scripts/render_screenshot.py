"""The extension catalogue's screenshot: the module's side-by-side comparison, rendered without Slicer's GUI.

The query and its four nearest matches are found and shown by the module's own code (a reference of
synthetic tumors embedded with the weight-free model, ``Reference.search``, ``scene.matches.show_matches``
on slicer-core's MRML scene: the layout, each view centred on its tumor, zoom and window/level linked);
each view's picture is then made by Slicer's own slice logic (``vtkMRMLSliceLogic``, the reslice and
blend a slice view displays), and the views are put in the layout's grid with their labels. The CTs are
the test suite's synthetic chest CTs (``Testing/Python/synthetic_ct.py``): no patient data.

    python scripts/render_screenshot.py [Resources/Screenshots/comparison.png]
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "SimilarPatients"), str(ROOT / "Testing" / "Python")]
VIEW = 320  # pixels per view
FIELD_OF_VIEW = 60.0  # mm across each view (the synthetic CTs are 77 mm wide)


def comparison(folder: Path):
    """The module's comparison of a synthetic query and its 4 nearest synthetic patients: (scene, views)."""
    import pandas as pd
    import SimpleITK as sitk
    import slicer
    from SimilarPatientsLib.imaging.tumor import from_binary_mask
    from SimilarPatientsLib.models.embedder import Embedder
    from SimilarPatientsLib.references import schema
    from SimilarPatientsLib.references.store import ReferenceStore
    from SimilarPatientsLib.scene import matches
    from synthetic_ct import KINDS, tumor_ct

    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene.color_logic = slicer.vtkMRMLColorLogic()  # the grey colour table a volume's display uses
    scene.color_logic.SetMRMLScene(scene)
    scene.layout_logic = slicer.vtkMRMLLayoutLogic()
    scene.layout_logic.SetMRMLScene(scene)
    rng, embedder = np.random.default_rng(26), Embedder("TumorDescriptor")

    def volume(image, name):
        path = folder / f"{name}.nrrd"
        sitk.WriteImage(image, str(path))
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.ReadData(node)
        return node

    rows, images = [], {}
    for i in range(12):
        image, mask, centre = tumor_ct(KINDS[i % len(KINDS)], rng)
        vector = embedder.embed(image, from_binary_mask(mask))[0]
        uid = f"2.25.{i + 1}"
        images[uid] = image
        rows.append({"model": vector.model, "recipe": vector.recipe, "PatientID": f"SYN-{i + 1:03d}"})
        rows[-1] |= {"embedding": vector.vector, "SeriesInstanceUID": uid}
        rows[-1] |= dict(zip(("center_x", "center_y", "center_z"), centre))
    reference = ReferenceStore(folder / "home").write("synthetic", schema.from_frame(pd.DataFrame(rows)), "screenshot")
    query_image, query_mask, query_centre = tumor_ct("spiculated", rng)
    vector = embedder.embed(query_image, from_binary_mask(query_mask))[0].vector
    hits = reference.search("TumorDescriptor", np.asarray([vector]), k=4)
    hits = hits.assign(closer_than=reference.closeness("TumorDescriptor", "cosine", hits.distance))
    query = volume(query_image, "Query CT")
    loaded = {uid: volume(images[uid], f"match {uid}") for uid in hits.SeriesInstanceUID}
    shown = matches.show_matches(scene, scene.layout_logic.GetLayoutNode(), query, query_centre, hits, loaded)
    query.GetDisplayNode().SetAutoWindowLevel(False)
    query.GetDisplayNode().SetWindowLevel(1400, -500)  # lung window, linked to every view
    return scene, shown


def render(scene, shown, out: Path) -> None:
    """Each view through Slicer's slice logic, in the layout's grid, labelled as Slicer labels its views."""
    import slicer
    from PIL import Image, ImageDraw
    from SimilarPatientsLib.scene import layout
    from vtk.util import numpy_support

    pictures = []
    for slice_node in shown.slice_nodes:
        slice_node.SetDimensions(VIEW, VIEW, 1)
        layout.fit_field_of_view(slice_node, FIELD_OF_VIEW)
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(slice_node)
        logic.UpdateImageData()
        connection = logic.GetImageDataConnection()
        connection.GetProducer().Update()
        data = connection.GetProducer().GetOutputDataObject(connection.GetIndex())
        width, height, _ = data.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(height, width, -1)
        picture = Image.fromarray(np.ascontiguousarray(rgba[::-1, :, :3]))  # VTK's rows run bottom-up
        name = next(
            scene.GetNodeByID(c.GetBackgroundVolumeID()).GetName()
            for c in _composites(scene)
            if c.GetLayoutName() == slice_node.GetLayoutName()
        )
        draw = ImageDraw.Draw(picture)
        draw.rectangle([0, 0, VIEW, 18], fill=(226, 192, 68) if slice_node.GetLayoutLabel() == "Q" else (140, 140, 140))
        draw.text((6, 3), f"{slice_node.GetLayoutLabel()}  {name}", fill=(0, 0, 0))
        pictures.append(picture)
    columns, step = math.ceil(math.sqrt(len(pictures))), VIEW + 2  # the layout's grid, views 2 px apart
    sheet = Image.new("RGB", (columns * step, math.ceil(len(pictures) / columns) * step), (0, 0, 0))
    for index, picture in enumerate(pictures):
        sheet.paste(picture, ((index % columns) * step, (index // columns) * step))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def _composites(scene):
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else ROOT / "Resources" / "Screenshots" / "comparison.png"
    with tempfile.TemporaryDirectory() as folder:
        scene, shown = comparison(Path(folder))
        render(scene, shown, out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
