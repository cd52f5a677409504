"""Similar Patients: the 3D Slicer module. GUI and a thin adapter only; the work is in SimilarPatientsLib."""

from __future__ import annotations

import logging
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: pip requirement -> module to import; installed on first use, after the user agrees.
REQUIREMENTS = {
    "pandas>=2.0": "pandas",
    "pyarrow>=14": "pyarrow",
    "duckdb>=1.0": "duckdb",
    "idc-index-data>=20": "idc_index_data",
    "faiss-cpu>=1.8": "faiss",
    "tqdm>=4.60": "tqdm",
}


class SimilarPatients(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Similar Patients"
        self.parent.categories = ["Informatics"]
        self.parent.contributors = ["SimilarPatients developers"]
        self.parent.helpText = (
            "Find the patients in NCI Imaging Data Commons whose tumor looks most like a query tumor, "
            "by nearest neighbours of foundation-model tumor embeddings."
        )
        self.parent.acknowledgementText = (
            "Reference embeddings: NLST-Sybil tumor embeddings published by the IDC team "
            "(ImagingDataCommons/nlst-sybil-connectome, Apache-2.0), derived from NLST data in IDC."
        )


def missing_requirements() -> list:
    import importlib.util

    return [req for req, module in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def ensure_requirements(ask: bool = True) -> bool:
    """Install missing Python packages into Slicer's Python, with the user's consent."""
    missing = missing_requirements()
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
        "Similar Patients needs these Python packages, which will be downloaded from PyPI and installed "
        "into Slicer's Python:\n\n" + "\n".join(missing),
        "Install Python packages?",
    ):
        return False
    with slicer.util.tryWithErrorDisplay("Installing Python packages failed.", waitCursor=True):
        slicer.util.pip_install(missing)
    return not missing_requirements()


class SimilarPatientsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.ui = slicer.util.childWidgetVariables(slicer.util.loadUI(self.resourcePath("UI/SimilarPatients.ui")))
        self.layout.addWidget(self.ui.SimilarPatients)
        self.layout.addStretch(1)
        self.logic = SimilarPatientsLogic()
        self.hits = None
        self.ui.metricComboBox.addItems(["cosine", "euclidean", "dot"])
        self.ui.referenceComboBox.currentTextChanged.connect(self.updateModels)
        self.ui.importNlstButton.clicked.connect(self.onImportNlst)
        self.ui.findButton.clicked.connect(self.onFind)
        self.ui.resultsTable.cellDoubleClicked.connect(self.onOpenViewer)
        self.ui.resultsTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.resultsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        if not missing_requirements():
            self.updateReferences()
        else:
            self.ui.statusLabel.text = "Python packages are installed when you first import or search."

    def updateReferences(self):
        self.ui.referenceComboBox.clear()
        self.ui.referenceComboBox.addItems(self.logic.references())

    def updateModels(self, name):
        self.ui.modelComboBox.clear()
        if name:
            self.ui.modelComboBox.addItems(self.logic.models(name))

    def progressDialog(self, title):
        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=100)

        def progress(done, total, message):
            dialog.labelText = message
            dialog.value = int(100 * done / total) if total else 0
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise RuntimeError("Cancelled.")

        return dialog, progress

    def onImportNlst(self):
        if not ensure_requirements():
            return
        if not self.logic.nlstLocalCopy() and not slicer.util.confirmOkCancelDisplay(
            "No local copy of the NLST-Sybil embeddings was found. Download them (about 20 MB) from GitHub "
            "(ImagingDataCommons/nlst-sybil-connectome)? Nothing about your data is sent.",
            "Download NLST-Sybil embeddings?",
        ):
            return
        dialog, progress = self.progressDialog("Importing NLST-Sybil")
        try:
            with slicer.util.tryWithErrorDisplay("Import failed.", waitCursor=True):
                self.logic.importNlst(progress)
        finally:
            dialog.close()
        self.updateReferences()
        self.ui.referenceComboBox.currentText = "nlst-sybil"

    def onFind(self):
        if not ensure_requirements():
            return
        with slicer.util.tryWithErrorDisplay("Search failed.", waitCursor=True):
            self.hits = self.logic.neighbors(
                self.ui.referenceComboBox.currentText,
                self.ui.modelComboBox.currentText,
                self.ui.patientLineEdit.text.strip(),
                k=self.ui.kSpinBox.value,
                metric=self.ui.metricComboBox.currentText,
            )
            self.showHits(self.hits)

    def showHits(self, hits):
        columns = [
            c
            for c in ["rank", "PatientID", "distance", "histology", "stage", "age", "sex", "smoking", "collection_id"]
            if c in hits.columns
        ]
        table = self.ui.resultsTable
        table.clear()
        table.setColumnCount(len(columns))
        table.setRowCount(len(hits))
        table.setHorizontalHeaderLabels(columns)
        for row, (_, hit) in enumerate(hits.iterrows()):
            for column, name in enumerate(columns):
                value = hit[name]
                text = f"{value:.4f}" if name == "distance" else ("" if value is None or value != value else str(value))
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()
        self.ui.statusLabel.text = f"{len(hits)} patients. Double-click a row to open it in the IDC viewer."

    def onOpenViewer(self, row, _column):
        url = self.hits.iloc[row]["viewer_url"] if self.hits is not None else None
        if url:
            qt.QDesktopServices.openUrl(qt.QUrl(url))


class SimilarPatientsLogic(ScriptedLoadableModuleLogic):
    """Adapter from the GUI to SimilarPatientsLib; nothing here but calls into the library."""

    def __init__(self, home=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.home = home

    def store(self):
        from SimilarPatientsLib import ReferenceStore

        return ReferenceStore(self.home)

    def references(self):
        return self.store().names()

    def models(self, reference):
        return self.store().open(reference).models

    def nlstLocalCopy(self):
        from SimilarPatientsLib.nlst_sybil import find_local_copy

        return find_local_copy()

    def importNlst(self, progress=None):
        return self.store().import_reference("nlst-sybil", "nlst-sybil", progress)

    def neighbors(self, reference, model, patient, k=5, metric="cosine"):
        return self.store().open(reference).search(model, patient=patient, k=k, metric=metric, exclude=[patient])


class SimilarPatientsTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the library imports in Slicer's Python and answers a search through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_neighbors_through_logic()

    def test_neighbors_through_logic(self):
        import tempfile

        import numpy as np
        import pandas as pd

        self.assertTrue(ensure_requirements(ask=False))
        from SimilarPatientsLib import ReferenceStore, schema

        home = tempfile.mkdtemp()
        rng = np.random.default_rng(0)
        frame = pd.DataFrame(
            {
                "model": "M",
                "PatientID": [f"P{i}" for i in range(20)],
                "embedding": list(rng.standard_normal((20, 8)).astype(np.float32)),
                "histology": ["adeno", "squamous"] * 10,
            }
        )
        ReferenceStore(home).write("selftest", schema.from_frame(frame), "self-test")
        logic = SimilarPatientsLogic(home)
        self.assertEqual(logic.references(), ["selftest"])
        self.assertEqual(logic.models("selftest"), ["M"])
        hits = logic.neighbors("selftest", "M", "P3", k=4)
        self.assertEqual(len(hits), 4)
        self.assertNotIn("P3", list(hits.PatientID))
        self.assertTrue(hits.distance.is_monotonic_increasing)
        logging.info("SimilarPatients self-test passed in %s", os.path.basename(home))
