"""The sample patient a clinician can try the module on without a CT of their own: a public IDC CT of an
NLST-Sybil patient whose tumor is in the reference, marked where the reference's own lesion record puts
it. Slicer's Sample Data module lists it (``SimilarPatients.py`` registers it); its button runs the
module's ``load_sample`` task, which downloads the series through the module's cache, with its questions
(packages, the download opt-in, its size), and shows it with the tumor point selected as the query.

Since the patient is in the reference, a query with a model whose weights and recipe are the reference's
finds the patient itself first, at a distance near 0: the whole chain checked on real data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A sample patient: its CT series in IDC and its tumor's centre (LPS mm) from the reference."""

    name: str  #: the Sample Data module's name for it
    title: str  #: the button's text
    patient: str
    series: str  #: SeriesInstanceUID, in IDC's index
    viewer: str  #: its page in the IDC viewer (``idc.viewer_url``; written out: the module imports this first)
    centre_lps: tuple
    histology: str
    stage: str

    @property
    def volume_name(self) -> str:
        return f"NLST {self.patient} CT"

    @property
    def tumor_name(self) -> str:
        return f"NLST {self.patient} tumor"


#: NLST patient 100158 (adenocarcinoma, stage IA; one lesion): the CT series and lesion centre of its
#: NLST-Sybil record (the reference's coordX/Y/Z; a test checks them against the published embeddings).
SAMPLE = Sample(
    name="SimilarPatientsNLST100158",
    title="NLST lung CT\n(Similar Patients)",
    patient="100158",
    series="1.2.840.113654.2.55.310609767809678441522963921292898109470",
    viewer="https://viewer.imaging.datacommons.cancer.gov/v3/viewer/?StudyInstanceUIDs=1.2.840.113654.2.55."
    "81185422866512279860334872268089089087&SeriesInstanceUIDs=1.2.840.113654.2.55."
    "310609767809678441522963921292898109470",
    centre_lps=(-108.68982529640198, 10.937564849853516, -149.44000244140625),
    histology="Adenocarcinoma, NOS",
    stage="IA",
)


def show_sample(scene, files, sample: Sample = SAMPLE) -> tuple:
    """The sample's CT read into a volume node by Slicer's reader, and its tumor as one point (RAS) at the
    reference's lesion centre; returns (volume, point list)."""
    from ..scene.matches import load_series

    volume = load_series(scene, files, sample.volume_name)
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", sample.tumor_name)
    x, y, z = sample.centre_lps
    point.AddControlPoint(-x, -y, z, "tumor centre (NLST-Sybil lesion record)")
    return volume, point


__all__ = ["SAMPLE", "Sample", "show_sample"]
