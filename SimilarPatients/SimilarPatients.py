"""Similar Patients: the 3D Slicer module. GUI and a thin adapter only; the work is in SimilarPatientsLib."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
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
#: What querying from an image adds. torch comes from Slicer's PyTorch extension (installed first, so that
#: nothing here pulls a torch build from PyPI); SimpleITK and pydicom ship with Slicer; highdicom (DICOM SEG
#: files) is not needed: in Slicer the tumor comes from a segmentation node.
EMBED_REQUIREMENTS = {
    "monai>=1.4": "monai",
    "einops>=0.7": "einops",
    "safetensors>=0.4": "safetensors",
}
#: The application setting that holds the user's opt-in to downloads (visible and revocable in the module).
DOWNLOADS_SETTING = "SimilarPatients/AllowDownloads"
#: BigQuery references (bq://PROJECT.DATASET.TABLE, ';'-separated) and the opt-in to searching them, which
#: sends the query tumor's embedding (never the image) to Google: both in the application settings.
BIGQUERY_REFERENCES_SETTING = "SimilarPatients/BigQueryReferences"
BIGQUERY_SETTING = "SimilarPatients/AllowBigQuery"
#: The torch the library needs (its MONAI networks and meta-device loading).
MINIMUM_TORCH = "2.1"
#: Packages Slicer ships that an install must never replace: pinned to the installed versions.
SLICER_PACKAGES = ("numpy", "SimpleITK", "pydicom", "requests", "vtk")


@parameterNodeWrapper
class SimilarPatientsParameterNode:
    """The module's state, kept in the scene (a saved scene restores it). ``volume``, ``k``, ``metric`` and
    ``filters`` are bound to widgets by their ``SlicerParameterName`` in the .ui file; ``reference`` and
    ``model`` are kept by the widget itself, because their choices (the data home's references, the
    reference's models) are only known at run time."""

    volume: slicer.vtkMRMLScalarVolumeNode
    reference: str = ""
    model: str = ""
    k: int = 5
    metric: Annotated[str, Choice(["cosine", "euclidean", "dot"])] = "cosine"
    filters: str = ""


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


def missing_requirements(requirements: dict = REQUIREMENTS) -> list:
    import importlib.util

    return [req for req, module in requirements.items() if importlib.util.find_spec(module) is None]


def slicer_constraints(folder: str) -> str:
    """A pip constraints file pinning the packages Slicer ships at their installed versions."""
    from importlib import metadata

    lines = []
    for name in SLICER_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    path = os.path.join(folder, "slicer-constraints.txt")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")
    return path


def ensure_requirements(ask: bool = True, requirements: dict = REQUIREMENTS) -> bool:
    """Install missing Python packages into Slicer's Python, with the user's consent, never replacing the
    packages Slicer ships (a constraints file). Slicer >= 5.12: ``slicer.packaging.pip_ensure``."""
    import tempfile

    missing = missing_requirements(requirements)
    if not missing:
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
        "Similar Patients needs these Python packages, which will be downloaded from PyPI and installed "
        "into Slicer's Python:\n\n" + "\n".join(missing),
        "Install Python packages?",
    ):
        return False
    with (
        tempfile.TemporaryDirectory() as folder,
        slicer.util.tryWithErrorDisplay("Installing Python packages failed.", waitCursor=True),
    ):
        constraints = slicer_constraints(folder)
        if hasattr(slicer, "packaging"):
            slicer.packaging.pip_ensure(missing, requester="Similar Patients", constraints=constraints)
        else:
            slicer.util.pip_install([*missing, "--constraint", constraints])
    return not missing_requirements(requirements)


def ensure_torch(ask: bool = True) -> bool:
    """PyTorch through Slicer's PyTorch extension (it picks the build for this computer's GPU)."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        return True
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            "Querying from an image needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
            "restart Slicer, and try again."
        )
        return False
    installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=ask, torchVersionRequirement=f">={MINIMUM_TORCH}"
    )
    return installed is not None


#: Column titles a clinician reads in the results table.
HEADERS = {
    "rank": "#",
    "PatientID": "Patient",
    "closer_than": "Similarity",
    "distance": "Distance",
    "collection_id": "Collection",
    "series_size_MB": "Series MB",
}


def filterTerms(text):
    """The filter box's expressions (separated by ';') as the library takes them."""
    return [term.strip() for term in str(text or "").split(";") if term.strip()]


def cellText(name, value):
    """A results-table cell: similarity as a sentence, distances with their digits, blanks for missing."""
    if value is None or value != value:
        return ""
    if name == "closer_than":
        return f"closer than {value:.0f}% of nearest matches"
    if name == "distance":
        return f"{value:.4g}"
    return str(value)


class SimilarPatientsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        widget = slicer.util.loadUI(self.resourcePath("UI/SimilarPatients.ui"))
        widget.setMRMLScene(slicer.mrmlScene)  # the node selectors list the scene's nodes
        self.ui = slicer.util.childWidgetVariables(widget)
        self.layout.addWidget(self.ui.SimilarPatients)
        self.layout.addStretch(1)
        self.logic = SimilarPatientsLogic()
        self.hits = None
        self.queryVolume = None  # the CT of the last image query, shown first when matches are loaded
        self.queryCentreLps = None
        self.comparison = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self._populating = False  # True while the combo boxes are refilled: not the user's choice
        self.ui.referenceComboBox.currentTextChanged.connect(self.onReferenceChosen)
        self.ui.modelComboBox.currentTextChanged.connect(self.onModelChosen)
        self.ui.importNlstButton.clicked.connect(self.onImportNlst)
        self.ui.findButton.clicked.connect(self.onFind)
        self.ui.imageFindButton.clicked.connect(self.onFindFromImage)
        self.ui.resultsTable.cellDoubleClicked.connect(self.onOpenViewer)
        self.ui.loadButton.clicked.connect(self.onLoadSelected)
        self.ui.allowDownloadsCheckBox.checked = self.logic.downloadsAllowed()
        self.ui.allowDownloadsCheckBox.toggled.connect(self.logic.allowDownloads)
        self.ui.clearCacheButton.clicked.connect(self.onClearCache)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.onWeightsPathChanged)
        self.ui.localDicomPathLineEdit.currentPath = self.logic.localDicomFolder() or ""
        self.ui.localDicomPathLineEdit.currentPathChanged.connect(self.logic.setLocalDicomFolder)
        self.ui.settingsCollapsibleButton.contentsCollapsed.connect(self.updateCacheInfo)
        self.ui.bigQueryLineEdit.text = "; ".join(self.logic.bigQueryReferences())
        self.ui.bigQueryLineEdit.editingFinished.connect(self.onBigQueryReferencesEdited)
        self.ui.allowBigQueryCheckBox.checked = self.logic.bigQueryAllowed()
        self.ui.allowBigQueryCheckBox.toggled.connect(self.onAllowBigQuery)
        self.ui.resultsTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.resultsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.initializeParameterNode()
        if not missing_requirements():
            self.updateReferences()
        else:
            self.ui.statusLabel.text = "Python packages are installed when you first import or search."

    def cleanup(self):
        self.removeObservers()
        self.setParameterNode(None)
        self.logic.cleanup()

    def onReload(self):
        """Reload the library's packages too, not only this file (a developer's edit takes effect)."""
        self.logic.cleanup()
        for name in [n for n in sys.modules if n == "SimilarPatientsLib" or n.startswith("SimilarPatientsLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A saved scene was loaded: its parameter node (reference, model, k, ...) takes over."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(SimilarPatientsParameterNode(self.logic.getParameterNode()))
        if self._parameterNode.volume is None:
            self._parameterNode.volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        """Bind the widgets to ``parameterNode`` (None: unbind); the reference and model are selected from it."""
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)  # volume, k, metric, filters
            if self.ui.referenceComboBox.count:  # the references are listed (the packages are installed)
                self.updateReferences()

    def updateReferences(self):
        """List the data home's references and their models, selecting the saved ones where they still exist."""
        saved = self._parameterNode.reference if self._parameterNode is not None else ""
        self.refill(self.ui.referenceComboBox, self.logic.references(), saved)
        self.updateModels(self.ui.referenceComboBox.currentText)

    def onReferenceChosen(self, name):
        if not self._populating:
            self.updateModels(name)

    def updateModels(self, name):
        saved = self._parameterNode.model if self._parameterNode is not None else ""
        self.refill(self.ui.modelComboBox, self.logic.models(name) if name else [], saved)
        for index in range(self.ui.modelComboBox.count):
            model = self.ui.modelComboBox.itemText(index)
            self.ui.modelComboBox.setItemData(index, self.logic.modelStatus(name, model), qt.Qt.ToolTipRole)
        self.onModelChosen(self.ui.modelComboBox.currentText)

    def refill(self, comboBox, items, saved):
        """Replace ``comboBox``'s items, selecting ``saved`` where it is among them; the signals this
        emits are not the user's choice (``_populating``)."""
        self._populating = True
        try:
            comboBox.clear()
            comboBox.addItems(items)
            if saved and comboBox.findText(saved) >= 0:
                comboBox.currentText = saved
        finally:
            self._populating = False

    def onModelChosen(self, model):
        """The user's (or the saved) reference and model go into the parameter node."""
        if self._populating:
            return
        if self._parameterNode is not None and model:
            self._parameterNode.reference = self.ui.referenceComboBox.currentText
            self._parameterNode.model = model
        self.updateWeightsPath(model)

    def progressDialog(self, title):
        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=100)

        def progress(done, total, message):
            from SimilarPatientsLib import Cancelled

            dialog.labelText = message
            dialog.value = int(100 * done / total) if total else 0
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise Cancelled()

        return dialog, progress

    def updateCacheInfo(self, collapsed=False):
        if not collapsed:
            self.ui.cacheInfoLabel.text = self.logic.cacheInfo()

    def onClearCache(self):
        if slicer.util.confirmOkCancelDisplay(
            "Delete the downloaded IDC series? They are downloaded again when needed."
        ):
            self.logic.clearSeriesCache()
            self.updateCacheInfo()

    def onBigQueryReferencesEdited(self):
        with slicer.util.tryWithErrorDisplay("Not a BigQuery table name.", waitCursor=False):
            self.logic.setBigQueryReferences(self.ui.bigQueryLineEdit.text.split(";"))
            self.ui.bigQueryLineEdit.text = "; ".join(self.logic.bigQueryReferences())
            if self.logic.bigQueryAllowed():
                self.updateReferences()

    def onAllowBigQuery(self, allowed):
        """The opt-in to BigQuery searches, kept in the application settings; the list follows it."""
        self.logic.allowBigQuery(allowed)
        if not missing_requirements():
            self.updateReferences()

    def updateWeightsPath(self, model):
        self.ui.weightsPathLineEdit.currentPath = self.logic.weightsFile(model) or ""

    def onWeightsPathChanged(self, path):
        self.logic.setWeightsFile(self.ui.modelComboBox.currentText, path)

    def downloadsOptIn(self, what):
        """True when downloads are allowed; else ask once, and keep the answer in the application settings
        (the module's checkbox shows it and takes it back)."""
        if self.logic.downloadsAllowed():
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"{what}\n\nAllow Similar Patients to download from the internet (reference embeddings, model weights "
            "and IDC image series)? Nothing about your patient is sent. You can take this back with the "
            "'Allow downloads' box.",
            "Allow downloads?",
        ):
            return False
        self.logic.allowDownloads(True)
        self.ui.allowDownloadsCheckBox.checked = True
        return True

    def onImportNlst(self):
        if not ensure_requirements():
            return
        if not self.logic.nlstLocalCopy() and not self.downloadsOptIn(
            "No local copy of the NLST-Sybil embeddings was found: they would be downloaded (about 20 MB) from "
            "GitHub (ImagingDataCommons/nlst-sybil-connectome)."
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
                where=filterTerms(self.ui.filterLineEdit.text),
            )
            self.showHits(self.hits)

    def onFindFromImage(self):
        model, reference = self.ui.modelComboBox.currentText, self.ui.referenceComboBox.currentText
        volume, marker = self.ui.volumeSelector.currentNode(), self.ui.pointSelector.currentNode()
        segmentation, segment = self.ui.segmentSelector.currentNode(), self.ui.segmentSelector.currentSegmentID()
        if volume is None or not (segment or marker):
            slicer.util.errorDisplay("Choose the CT volume, and the tumor as a segment, a point list or an ROI.")
            return
        if not (ensure_requirements() and ensure_requirements(requirements=EMBED_REQUIREMENTS) and ensure_torch()):
            return
        with slicer.util.tryWithErrorDisplay("Search failed.", waitCursor=False):
            licence = self.logic.licenceToAccept(model)
            if licence and not slicer.util.confirmOkCancelDisplay(
                f"{model}'s weights are published under: {licence}.\n\nDo you accept this licence?", "Weight licence"
            ):
                return
            if licence:
                self.logic.acceptLicence(model)
            source = self.logic.weightsToDownload(model)
            if source and not self.downloadsOptIn(f"The {model} weights would be downloaded from {source}."):
                return
            dialog = slicer.util.createProgressDialog(
                windowTitle="Similar Patients", labelText=f"Embedding the tumor with {model}...", maximum=0
            )

            def cancelled():
                slicer.app.processEvents()
                return dialog.wasCanceled

            try:
                self.queryVolume = volume
                self.hits = self.logic.findSimilar(
                    volume,
                    segmentation if segment else marker,
                    segmentId=segment or None,
                    model=model,
                    reference=reference,
                    k=self.ui.kSpinBox.value,
                    metric=self.ui.metricComboBox.currentText,
                    where=filterTerms(self.ui.filterLineEdit.text),
                    cancelled=cancelled,
                )
            finally:
                dialog.close()
            self.showHits(self.hits)
        self.showThumbnails()

    def showHits(self, hits):
        fields = self.logic.displayFields(self.ui.referenceComboBox.currentText)
        wanted = ["rank", "PatientID", "closer_than", "distance", *fields, "collection_id", "series_size_MB"]
        columns = [c for c in wanted if c in hits.columns]
        table = self.ui.resultsTable
        table.clear()
        table.setColumnCount(len(columns))
        table.setRowCount(len(hits))
        table.setHorizontalHeaderLabels(columns)
        for row, (_, hit) in enumerate(hits.iterrows()):
            for column, name in enumerate(columns):
                table.setItem(row, column, qt.QTableWidgetItem(cellText(name, hit[name])))
        table.setHorizontalHeaderLabels([HEADERS.get(c, c) for c in columns])
        table.resizeColumnsToContents()
        self.ui.statusLabel.text = f"{len(hits)} patients. Double-click a row to open it in the IDC viewer."
        self.ui.queryThumbnailLabel.visible = False
        self.queryCentreLps = self.logic.lastSeedLps
        self.ui.loadButton.enabled = self.queryVolume is not None and len(hits) > 0

    def showThumbnails(self):
        """The query tumor's picture above the table, and each match's beside its rank where its images are on
        this machine (the site's DICOM folder or the download cache); nothing is downloaded for them."""
        if self.hits is None or not self.logic.lastThumbnails:
            return
        self.ui.queryThumbnailLabel.setPixmap(qt.QPixmap(self.logic.lastThumbnails[0]))
        self.ui.queryThumbnailLabel.visible = True
        try:
            with slicer.util.WaitCursor():
                pictures = self.logic.matchThumbnails(self.hits)
        except Exception as error:  # a picture is a convenience: say why it is missing, keep the results
            logging.warning("Match thumbnails: %s", error)
            return
        table = self.ui.resultsTable
        table.setIconSize(qt.QSize(64, 64))
        for row, uid in enumerate(self.hits.get("SeriesInstanceUID", [])):
            if uid in pictures:
                table.item(row, 0).setIcon(qt.QIcon(pictures[uid]))
                table.setRowHeight(row, 68)

    def onLoadSelected(self):
        """The selected matches (all, when none is selected; at most 8) beside the query, after the user
        confirmed what is downloaded from IDC."""
        if self.hits is None or self.queryVolume is None:
            return
        rows = sorted({index.row() for index in self.ui.resultsTable.selectedIndexes()}) or list(range(len(self.hits)))
        chosen = self.hits.iloc[rows[:8]]
        local = self.logic.localDicomFolder()
        with slicer.util.tryWithErrorDisplay("Loading the matches failed.", waitCursor=True):
            if local:  # a site's own copy: nothing is downloaded
                self.comparison = self.logic.loadMatches(
                    chosen, self.queryVolume, self.queryCentreLps, localFolder=local
                )
                return
            size = self.logic.downloadSize(chosen)
            if size and not self.downloadsOptIn(
                f"{size:.0f} MB of CT series would be downloaded from NCI Imaging Data Commons (their identifiers "
                "are sent to IDC's public storage)."
            ):
                return
            self.comparison = self.logic.loadMatches(chosen, self.queryVolume, self.queryCentreLps)

    def onOpenViewer(self, row, _column):
        url = self.hits.iloc[row]["viewer_url"] if self.hits is not None else None
        if url:
            qt.QDesktopServices.openUrl(qt.QUrl(url))


class SimilarPatientsLogic(ScriptedLoadableModuleLogic):
    """Adapter from the GUI to SimilarPatientsLib; nothing here but calls into the library."""

    def __init__(self, home=None, python=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.home = home
        self.python = python  # the worker's interpreter (default: PythonSlicer)
        self._worker = None
        self._image_key = None  # the volume whose voxels the worker holds
        self._thumbnails = None  # the folder the worker draws the tumors' thumbnails in
        self.lastVolume = None  # the CT of the last image query
        self.lastSeedLps = None  # the tumor seed of the last image query (LPS mm)
        self.lastThumbnails = []  # its tumors' thumbnails (PNG paths)

    def store(self):
        from SimilarPatientsLib import ReferenceStore

        return ReferenceStore(self.home)

    def references(self):
        """The stored references, then the BigQuery tables of the settings once BigQuery searches are allowed."""
        return self.store().names() + (self.bigQueryReferences() if self.bigQueryAllowed() else [])

    def open(self, reference):
        """A stored reference, or a BigQuery one (bq://...), refused unless BigQuery searches are allowed."""
        from SimilarPatientsLib import SimilarPatientsError
        from SimilarPatientsLib.cloud import is_bigquery, open_reference

        if is_bigquery(reference) and not self.bigQueryAllowed():
            raise SimilarPatientsError(
                f"{reference} is a BigQuery reference: searching it sends the query's embedding to Google. Allow "
                f"BigQuery searches in the module's settings first."
            )
        return open_reference(reference, self.store())

    def models(self, reference):
        return self.open(reference).models

    def displayFields(self, reference):
        """The label fields the reference declares for people to see, in order."""
        return self.open(reference).display_fields if reference else []

    def nlstLocalCopy(self):
        from SimilarPatientsLib.references.nlst_sybil import find_local_copy

        return find_local_copy()

    def importNlst(self, progress=None):
        return self.store().import_reference("nlst-sybil", "nlst-sybil", progress)

    def neighbors(self, reference, model, patient, k=5, metric="cosine", where=None):
        """A reference patient's nearest patients, each with its similarity (closeness percentile)."""
        opened = self.open(reference)
        hits = opened.search(model, patient=patient, k=k, metric=metric, exclude=[patient], where=where)
        if not hasattr(opened, "closeness"):  # BigQuery: the distribution is not measured there
            return hits.assign(closer_than=float("nan"))
        return hits.assign(closer_than=opened.closeness(model, metric, hits.distance))

    def modelStatus(self, reference, model):
        """One line on a reference's model: its recipe, whether it runs from an image here, its licence and
        its weights (here, or how much a first query downloads)."""
        from SimilarPatientsLib import SimilarPatientsError, models

        recipe = self.open(reference).model_info(model).recipe
        try:
            spec = models.get(model)
        except SimilarPatientsError as error:
            return f"{model} ({recipe}): search by patient only; {error}"
        if spec.with_recipe(None).name != recipe and recipe not in [r.name for r in spec.other_recipes]:
            return f"{model} ({recipe}): search by patient only; the reference was built with another recipe"
        state = models.status(model, spec.weights)
        if state.source is None:
            weights = "no weights needed"
        elif state.present is not None:
            weights = "weights on this computer"
        else:
            size = f"{state.source.size / 1e6:.0f} MB" if state.source.size else f"at least {spec.encoder_mb} MB"
            weights = f"a first query downloads {size} of weights"
        licence = "no licence" if state.source is None else state.source.licence
        return f"{model} ({recipe}): {licence}; {weights}; runs on the GPU when there is one, else the CPU"

    def cacheInfo(self):
        """Where the data lives and how much the downloaded series take."""
        from SimilarPatientsLib.util.home import data_home

        cache = self.seriesCache().root
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6 if cache.is_dir() else 0.0
        return f"References and weights: {self.home or data_home()}. Downloaded series: {cache} ({size:.0f} MB)."

    def clearSeriesCache(self):
        return self.seriesCache().clear()

    def weightsFile(self, model):
        """The weights file chosen for ``model`` (offline sites), or None."""
        path = qt.QSettings().value(f"SimilarPatients/Weights/{model}", "")
        return str(path) if path else None

    def setWeightsFile(self, model, path):
        qt.QSettings().setValue(f"SimilarPatients/Weights/{model}", str(path or ""))

    def localDicomFolder(self):
        """A site's DICOM folder to load matches from instead of downloading them, or None."""
        path = qt.QSettings().value("SimilarPatients/LocalDicomFolder", "")
        return str(path) if path else None

    def setLocalDicomFolder(self, path):
        qt.QSettings().setValue("SimilarPatients/LocalDicomFolder", str(path or ""))

    def downloadsAllowed(self):
        """The user's opt-in to downloads, from the application settings."""
        return str(qt.QSettings().value(DOWNLOADS_SETTING, "false")).lower() == "true"

    def allowDownloads(self, allowed):
        qt.QSettings().setValue(DOWNLOADS_SETTING, "true" if allowed else "false")

    def bigQueryAllowed(self):
        """The user's opt-in to BigQuery searches (they send the query's embedding to Google)."""
        return str(qt.QSettings().value(BIGQUERY_SETTING, "false")).lower() == "true"

    def allowBigQuery(self, allowed):
        qt.QSettings().setValue(BIGQUERY_SETTING, "true" if allowed else "false")

    def bigQueryReferences(self):
        """The BigQuery tables the user listed, as bq://PROJECT.DATASET.TABLE names."""
        return [n for n in str(qt.QSettings().value(BIGQUERY_REFERENCES_SETTING, "") or "").split(";") if n]

    def setBigQueryReferences(self, names):
        """Keep ``names`` (PROJECT.DATASET.TABLE or bq://...), each checked, as the BigQuery references."""
        from SimilarPatientsLib.cloud import parse_table

        urls = [parse_table(str(n).strip()).url for n in names if str(n).strip()]
        qt.QSettings().setValue(BIGQUERY_REFERENCES_SETTING, ";".join(urls))

    def weightStatus(self, model):
        from SimilarPatientsLib import models

        return models.status(model, models.get(model).weights)

    def licenceToAccept(self, model):
        """The weight licence the user must accept before ``model``'s weights are fetched, or None."""
        state = self.weightStatus(model)
        return state.source.licence if state.needs_acceptance and not self.weightsFile(model) else None

    def acceptLicence(self, model):
        from SimilarPatientsLib.models import weights

        weights.acknowledge(model)

    def weightsToDownload(self, model):
        """The URL ``model``'s weights would be downloaded from, or None when they are here (or not needed)."""
        from SimilarPatientsLib.models.weights import download_url

        state = self.weightStatus(model)
        return download_url(model, state.source) if state.needs_download and not self.weightsFile(model) else None

    def findSimilar(self, volumeNode, tumorNode, segmentId=None, model="CTFM", reference="nlst-sybil", k=5, **options):
        """The Python console's call: the ``k`` reference patients nearest to the tumor marked by
        ``tumorNode`` in ``volumeNode``, as the library's hit table (rank, PatientID, distance, closer_than,
        labels, UIDs, viewer_url). ``tumorNode``: a segmentation (``segmentId``, or each of its segments
        when None), a point list (each point a tumor) or an ROI. ``options``: metric, where, progress,
        cancelled. Load the matches with :meth:`loadMatches`."""
        if tumorNode is None:
            raise ValueError("Give the tumor: a segmentation, a point list or an ROI node.")
        if tumorNode.IsA("vtkMRMLSegmentationNode"):
            segments = [segmentId] if segmentId else list(tumorNode.GetSegmentation().GetSegmentIDs())
            return self.queryFromImage(
                volumeNode, reference, model, segmentation=tumorNode, segment=segments, k=k, **options
            )
        if tumorNode.IsA("vtkMRMLMarkupsROINode"):
            return self.queryFromImage(volumeNode, reference, model, roi=tumorNode, k=k, **options)
        if tumorNode.IsA("vtkMRMLMarkupsNode"):
            return self.queryFromImage(volumeNode, reference, model, point=tumorNode, k=k, **options)
        raise ValueError(f"{tumorNode.GetName()} ({tumorNode.GetClassName()}) cannot mark a tumor.")

    def queryFromImage(
        self, volume, reference, model, segmentation=None, segment=None, point=None, roi=None, **options
    ):
        """Nearest reference patients to a tumor in a volume node, marked by a segment (or a list of segment
        IDs: several tumors of one patient), the points of a point list, or an ROI box. The nodes' voxels
        are copied out in memory (the user's nodes and their storage are not touched) to a temporary folder
        the worker reads; the query runs in the persistent worker."""
        import shutil
        import tempfile

        import SimpleITK as sitk
        from SimilarPatientsLib.scene import nodes
        from SimilarPatientsLib.scene.worker import ImageNotHeld

        folder = tempfile.mkdtemp(prefix="SimilarPatients-")
        try:
            marks = {}
            if segmentation is not None:  # one mask per segment: the worker makes one tumor of each
                segments = [segment] if isinstance(segment, str) or segment is None else list(segment)
                marks["masks"] = []
                for index, segmentId in enumerate(segments):
                    marks["masks"].append(os.path.join(folder, f"mask-{index}.nrrd"))
                    sitk.WriteImage(nodes.segment_mask(segmentation, segmentId), marks["masks"][-1], False)
            elif roi is not None:
                marks["boxes_lps"] = [[*low, *high] for low, high in [nodes.roi_tumor(roi).box]]
            elif point is not None:
                marks["points_lps"] = [t.seed for t in nodes.point_tumors(point)]
            else:
                raise ValueError("Mark the tumor with a segment, a point list or an ROI.")
            self.lastVolume = volume
            # the CT goes to the worker only when it changed since the last query: its key says which voxels
            key = f"{volume.GetID()}:{volume.GetMTime()}:{volume.GetImageData().GetMTime()}"
            if key == self._image_key and self._worker is not None and self._worker.running:
                try:
                    return self.queryFiles(None, reference, model, image_key=key, **marks, **options)
                except ImageNotHeld:
                    pass
            image = os.path.join(folder, "image.nrrd")
            sitk.WriteImage(nodes.volume_image(volume), image, False)
            hits = self.queryFiles(image, reference, model, image_key=key, **marks, **options)
            self._image_key = key
            return hits
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def worker(self):
        """The persistent query worker, started on first use with Slicer's own Python (PythonSlicer)."""
        if self._worker is None:
            import shutil

            from SimilarPatientsLib.scene.worker import WorkerClient

            python = self.python or shutil.which("PythonSlicer")
            if python is None:
                from SimilarPatientsLib import SimilarPatientsError

                raise SimilarPatientsError(
                    "PythonSlicer was not found next to Slicer; it runs the queries. Reinstall Slicer."
                )
            environment = dict(os.environ)
            if self.home is not None:
                environment["SIMILARPATIENTS_HOME"] = str(self.home)
            self._worker = WorkerClient(python, environment)
        return self._worker

    def queryFiles(
        self,
        image,
        reference,
        model,
        mask=None,
        point_ras=None,
        points_lps=None,
        masks=None,
        boxes_lps=None,
        k=5,
        metric="cosine",
        cancelled=None,
        progress=None,
        image_key=None,
        where=None,
    ):
        """Run the image query in the worker and return its hits (a DataFrame); the tumor is a mask file (or
        several, one tumor each), a point in RAS (Slicer's world), points in LPS or boxes in LPS (six numbers:
        two opposite corners)."""
        import pandas as pd
        from SimilarPatientsLib.imaging.tumor import from_point

        if mask is not None:
            tumors = {"mask": str(mask)}
        elif masks:
            tumors = {"masks": [str(m) for m in masks]}
        elif boxes_lps:
            tumors = {"boxes": [list(b) for b in boxes_lps]}
        else:
            points = points_lps if points_lps is not None else [from_point(point_ras, ras=True).seed]
            tumors = {"points": [list(p) for p in points]}
        result = self.worker().query(
            progress=progress,
            cancelled=cancelled,
            image=None if image is None else str(image),
            image_key=image_key,
            tumors=tumors,
            model=model,
            reference=reference,
            k=int(k),
            metric=metric,
            where=list(where or []),
            weights=self.weightsFile(model),
            thumbnail_folder=str(self.thumbnailFolder()),
        )
        self.lastSeedLps = result["seeds"][0]
        self.lastThumbnails = result.get("thumbnails") or []
        return pd.DataFrame(result["hits"])

    def thumbnailFolder(self):
        """A folder of this session's tumor thumbnails (removed by :meth:`cleanup`)."""
        if self._thumbnails is None:
            import tempfile

            self._thumbnails = Path(tempfile.mkdtemp(prefix="SimilarPatients-thumbnails-"))
        return self._thumbnails

    def localSeriesFiles(self, hits, localFolder=None):
        """The matches' series already on this machine (``localFolder``, by default the site's DICOM folder
        setting, or else the download cache): SeriesInstanceUID → files. Nothing is downloaded."""
        from SimilarPatientsLib.idc.download import series_files

        uids = hits.SeriesInstanceUID.dropna().tolist() if "SeriesInstanceUID" in hits else []
        localFolder = localFolder or self.localDicomFolder()
        if not uids:
            return {}
        if localFolder:
            return series_files(localFolder, uids)
        root = self.seriesCache().root
        cached = {uid: root / uid for uid in uids}
        return {
            uid: sorted(p for p in folder.rglob("*") if p.is_file())
            for uid, folder in cached.items()
            if folder.is_dir()
        }

    def matchThumbnails(self, hits, localFolder=None, cancelled=None):
        """Thumbnails (SeriesInstanceUID → PNG path) of the matches whose images are local, each drawn at its
        tumor centre; series that are not here are skipped (they are not downloaded for a picture)."""
        local = self.localSeriesFiles(hits, localFolder)
        series = []
        for hit in hits.to_dict("records"):
            centre = [hit.get(f"center_{axis}") for axis in "xyz"]
            if local.get(hit.get("SeriesInstanceUID")) and all(c is not None and c == c for c in centre):
                series.append(
                    {"uid": hit["SeriesInstanceUID"], "file": str(local[hit["SeriesInstanceUID"]][0]), "centre": centre}
                )
        if not series:
            return {}
        result = self.worker().thumbnails(self.thumbnailFolder(), series, cancelled=cancelled)
        for uid, reason in result["failed"].items():
            logging.warning("No thumbnail for series %s: %s", uid, reason)
        return result["thumbnails"]

    def seriesCache(self):
        """Matched series are kept beside Slicer's DICOM database (or in the data home without one)."""
        from SimilarPatientsLib.idc.download import SeriesCache

        database = getattr(slicer, "dicomDatabase", None)
        folder = database.databaseDirectory if database is not None and database.isOpen else None
        return SeriesCache(os.path.join(folder, "SimilarPatients-series") if folder else None)

    def downloadSize(self, hits):
        """Megabytes the matches' series need from IDC (0 when all are cached)."""
        return self.seriesCache().download_size_mb(hits.SeriesInstanceUID.dropna().tolist())

    def loadMatches(self, hits, queryVolume=None, queryCentreLps=None, progress=None, localFolder=None):
        """Fetch the matches' series (cache first; or from ``localFolder``, a site's DICOM folder, with no
        network), read them into volume nodes, and show them beside the query (by default the last query's
        CT and tumor), each view centred on its tumor; returns the views and their links."""
        from DICOMLib import DICOMUtils
        from SimilarPatientsLib import SimilarPatientsError
        from SimilarPatientsLib.idc.download import series_files
        from SimilarPatientsLib.scene import matches

        queryVolume = queryVolume if queryVolume is not None else self.lastVolume
        queryCentreLps = queryCentreLps if queryCentreLps is not None else self.lastSeedLps
        if queryVolume is None or queryCentreLps is None:
            raise SimilarPatientsError("Find similar patients from an image first: the matches are shown beside it.")
        uids = hits.SeriesInstanceUID.dropna().tolist()
        if localFolder is not None:
            files = series_files(localFolder, uids)
            if not files:
                raise SimilarPatientsError(f"{localFolder} holds none of the matches' series.")
        else:
            files = {uid: list(found.files) for uid, found in self.seriesCache().fetch(uids, progress).items()}
        for paths in files.values():  # the DICOM browser knows them too (importing twice is harmless)
            DICOMUtils.importDicom(str(Path(paths[0]).parent))
        volumes = {
            uid: matches.load_series(slicer.mrmlScene, paths, f"match {uid[-8:]}") for uid, paths in files.items()
        }
        layoutNode = slicer.app.layoutManager().layoutLogic().GetLayoutNode()
        return matches.show_matches(slicer.mrmlScene, layoutNode, queryVolume, queryCentreLps, hits, volumes)

    def cleanup(self):
        """End the worker (module reload, Slicer closing)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._thumbnails is not None:
            import shutil

            shutil.rmtree(self._thumbnails, ignore_errors=True)
            self._thumbnails = None


class SimilarPatientsTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the library imports in Slicer's Python and answers a search through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_neighbors_through_logic()
        self.setUp()
        self.test_query_from_image_through_logic()

    def test_neighbors_through_logic(self):
        import tempfile

        import numpy as np
        import pandas as pd

        self.assertTrue(ensure_requirements(ask=False))
        from SimilarPatientsLib import ReferenceStore
        from SimilarPatientsLib.references import schema

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

    def test_query_from_image_through_logic(self):
        """Volume and segment nodes → the worker → hits; then the top match loaded from a local DICOM folder
        the test writes, shown beside the query, each view centred on its tumor."""
        import tempfile

        import numpy as np
        import pandas as pd
        import SimpleITK as sitk
        from SimilarPatientsLib import ReferenceStore
        from SimilarPatientsLib.imaging import from_binary_mask
        from SimilarPatientsLib.models import Embedder
        from SimilarPatientsLib.references import schema

        spacing = (0.8, 0.8, 1.2)

        def ct_with_sphere(radius):
            z, y, x = np.mgrid[:48, :64, :64]
            inside = (x - 32) ** 2 + (y - 32) ** 2 + ((z - 24) * 1.5) ** 2 <= radius**2
            return np.where(inside, 40, -850).astype(np.int16), inside.astype(np.uint8)

        folder = tempfile.mkdtemp()
        embedder, rows = Embedder("TumorDescriptor"), []
        for radius in (5, 6, 9, 10):
            values, inside = ct_with_sphere(radius)
            image, mask = sitk.GetImageFromArray(values), sitk.GetImageFromArray(inside)
            for item in (image, mask):
                item.SetSpacing(spacing)
            vector = embedder.embed(image, from_binary_mask(mask))[0]
            series = writeDicomSeries(image, os.path.join(folder, f"R{radius}"))
            centre = image.TransformContinuousIndexToPhysicalPoint((32.0, 32.0, 24.0))  # the sphere's centre, LPS
            rows.append({"model": vector.model, "recipe": vector.recipe, "PatientID": f"R{radius}"})
            rows[-1].update({"SeriesInstanceUID": series, "embedding": vector.vector})
            rows[-1].update(dict(zip(("center_x", "center_y", "center_z"), centre)))
        home = tempfile.mkdtemp()
        ReferenceStore(home).write("selftest-image", schema.from_frame(pd.DataFrame(rows)), "self-test")

        values, inside = ct_with_sphere(9.5)
        volume = slicer.util.addVolumeFromArray(values, ijkToRAS=None, name="SelfTestCT")
        volume.SetSpacing(*spacing)
        labelmap = slicer.util.addVolumeFromArray(inside, nodeClassName="vtkMRMLLabelMapVolumeNode")
        labelmap.SetSpacing(*spacing)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segment = segmentation.GetSegmentation().GetNthSegmentID(0)
        centre = (32 * spacing[0], 32 * spacing[1], 24 * spacing[2])  # the query sphere's centre, RAS
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(centre)
        roi.SetSize(24, 24, 24)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        points.AddControlPoint(*centre)
        logic = SimilarPatientsLogic(home)
        try:
            hits = logic.findSimilar(
                volume, segmentation, segment, model="TumorDescriptor", reference="selftest-image", k=2
            )
            self.assertEqual(set(hits.PatientID), {"R9", "R10"})
            self.assertEqual(len(logic.lastThumbnails), 1)
            self.assertTrue(os.path.isfile(logic.lastThumbnails[0]))
            pictures = logic.matchThumbnails(hits, localFolder=folder)
            self.assertEqual(set(pictures), set(hits.SeriesInstanceUID))
            seed = logic.lastSeedLps
            for marker in (roi, points):  # the same tumor boxed, and clicked: the seed is its centre
                self.assertEqual(
                    len(logic.findSimilar(volume, marker, model="TumorDescriptor", reference="selftest-image", k=2)), 2
                )
                self.assertTrue(np.allclose(logic.lastSeedLps, (-centre[0], -centre[1], centre[2]), atol=1e-3))
            hits = logic.findSimilar(
                volume, segmentation, segment, model="TumorDescriptor", reference="selftest-image", k=2
            )
            self.assertTrue(np.allclose(logic.lastSeedLps, seed))
            comparison = logic.loadMatches(hits.head(1), localFolder=folder)  # beside the last query
        finally:
            logic.cleanup()
        self.assertEqual(len(comparison.slice_nodes), 2)  # the query and its top match
        top = hits.iloc[0]
        for sliceNode, (x, y, z) in zip(
            comparison.slice_nodes, [logic.lastSeedLps, (top.center_x, top.center_y, top.center_z)]
        ):
            centre = [sliceNode.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
            self.assertTrue(np.allclose(centre, (-x, -y, z), atol=1.2), f"{sliceNode.GetName()} at {centre}")
        logging.info("SimilarPatients image-query and load self-test passed")


def writeDicomSeries(image, folder):
    """Write a CT as a DICOM series (one file per slice, SimpleITK); returns its SeriesInstanceUID."""
    import time

    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    stamp = f"{time.time():.6f}".replace(".", "")
    study, series = f"1.2.826.0.1.3680043.8.498.{stamp}.1", f"1.2.826.0.1.3680043.8.498.{stamp}.2"
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series}.{index + 1}",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(index + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, index))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{index:04d}.dcm"))
        writer.Execute(plane)
    return series
