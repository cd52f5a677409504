"""Similar Patients: the 3D Slicer module. Qt wiring only: what each action does, in what order, and which
buttons are enabled is decided by SimilarPatientsLib.ui (tested outside Slicer); the work is the library's."""

from __future__ import annotations

import logging
from typing import Annotated

import qt
import slicer
from SimilarPatientsLib.scene.watch import SceneWatch
from SimilarPatientsLib.ui import Inputs, ModuleController, ModuleLogic, ModuleSettings, dependencies, self_test
from SimilarPatientsLib.ui.controller import K_RANGE, similar_by_choice
from SimilarPatientsLib.ui.sample import SAMPLE
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The widget of each action the controller enables or disables.
ACTION_WIDGETS = {
    "import": "importNlstButton",
    "find": "findButton",
    "find_image": "imageFindButton",
    "load": "loadButton",
    "clear_cache": "clearCacheButton",
    "like": "likeButton",
    "unlike": "unlikeButton",
    "more": "moreButton",
}


@parameterNodeWrapper
class SimilarPatientsParameterNode:
    """The module's state, kept in the scene (a saved scene restores it). ``volume``, ``k``, ``metric`` and
    ``filters`` are bound to widgets by their ``SlicerParameterName`` in the .ui file; ``reference`` and
    ``model`` are kept by the widget itself, because their choices (the data home's references, the
    reference's models) are only known at run time."""

    volume: slicer.vtkMRMLScalarVolumeNode
    reference: str = ""
    model: str = ""
    k: Annotated[int, WithinRange(*K_RANGE)] = 5
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
        slicer.app.connect("startupCompleted()", registerSampleData)  # once the Sample Data module is there


def registerSampleData():
    """The sample patient (``SimilarPatientsLib/ui/sample.py``) in the Sample Data module; its button loads it
    through this module: the download is asked for, cached and shown with its tumor as the query."""
    import os

    try:
        import SampleData
    except ImportError:  # the Sample Data module is turned off in this Slicer: nothing to register with
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Similar Patients",
        sampleName=SAMPLE.name,
        uris=SAMPLE.viewer,  # shown by Sample Data; the download is the module's (IDC's buckets, through its cache)
        fileNames=SAMPLE.name,
        nodeNames=SAMPLE.volume_name,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "SimilarPatients.png"),
        customDownloader=loadSample,
    )


def loadSample(source=None):
    """The Sample Data module's button: open this module and load the sample patient as the query."""
    slicer.util.selectModule("SimilarPatients")
    slicer.modules.similarpatients.widgetRepresentation().self().controller.load_sample()


class SimilarPatientsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The controller's view: it shows what the controller asks and hands it the widgets' values."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # its observers, removed in cleanup

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        widget = slicer.util.loadUI(self.resourcePath("UI/SimilarPatients.ui"))
        widget.setMRMLScene(slicer.mrmlScene)  # the node selectors list the scene's nodes
        self.ui = slicer.util.childWidgetVariables(widget)
        self.layout.addWidget(self.ui.SimilarPatients)
        self.layout.addStretch(1)
        self.logic = SimilarPatientsLogic()
        installer = dependencies.SlicerInstaller(on_line=self.onPipOutput)
        self.controller = ModuleController(self, self.logic, installer)
        self.actionTexts = {action: getattr(self.ui, name).text for action, name in ACTION_WIDGETS.items()}
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._populating = False  # True while the combo boxes are refilled: not the user's choice
        self.timer = qt.QTimer()  # resumes the controller's task when its background job ends
        self.timer.setInterval(50)
        self.timer.timeout.connect(self.controller.poll)
        self.timer.start()
        self.sceneWatch = SceneWatch(slicer.mrmlScene, self.onSceneClosing, self.controller.node_removed)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneLoaded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneLoaded)
        ui, controller, settings = self.ui, self.controller, self.logic.settings
        ui.referenceComboBox.currentTextChanged.connect(self.onReferenceChosen)
        ui.modelComboBox.currentTextChanged.connect(self.onModelChosen)
        ui.importNlstButton.clicked.connect(controller.import_nlst)
        ui.findButton.clicked.connect(lambda: controller.find_by_patient(self.inputs()))
        ui.imageFindButton.clicked.connect(lambda: controller.find_from_image(self.inputs()))
        ui.loadButton.clicked.connect(lambda: controller.load_selected(self.inputs()))
        ui.likeButton.clicked.connect(lambda: controller.mark(self.inputs().selected_rows, "like"))
        ui.unlikeButton.clicked.connect(lambda: controller.mark(self.inputs().selected_rows, "unlike"))
        ui.moreButton.clicked.connect(controller.more_like_these)
        ui.resultsTable.cellDoubleClicked.connect(lambda row, _column: controller.open_viewer(row))
        ui.allowDownloadsCheckBox.checked = settings.downloads_allowed
        ui.allowDownloadsCheckBox.toggled.connect(controller.allow_downloads)
        ui.clearCacheButton.clicked.connect(lambda: (controller.clear_cache(), self.updateCacheInfo()))
        ui.weightsPathLineEdit.currentPathChanged.connect(
            lambda path: settings.set_weights_file(ui.modelComboBox.currentText, path)
        )
        ui.localDicomPathLineEdit.currentPath = settings.local_dicom_folder or ""
        ui.localDicomPathLineEdit.currentPathChanged.connect(lambda path: setattr(settings, "local_dicom_folder", path))
        ui.settingsCollapsibleButton.contentsCollapsed.connect(self.updateCacheInfo)
        ui.bigQueryLineEdit.text = "; ".join(settings.bigquery_references)
        ui.bigQueryLineEdit.editingFinished.connect(self.onBigQueryReferencesEdited)
        ui.allowBigQueryCheckBox.checked = settings.bigquery_allowed
        ui.allowBigQueryCheckBox.toggled.connect(lambda allowed: controller.allow_bigquery(allowed, self.inputs()))
        ui.resultsTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        ui.resultsTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)

    def cleanup(self):
        self.timer.stop()
        self.sceneWatch.remove()
        self.removeObservers()
        self.setParameterNode(None)
        self.logic.cleanup()

    def onReload(self):
        """Reload the library's packages too, not only this file (a developer's edit takes effect)."""
        import sys

        self.cleanup()
        for name in [n for n in sys.modules if n == "SimilarPatientsLib" or n.startswith("SimilarPatientsLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()
        self.controller.entered(self.inputs())

    def exit(self):
        self.setParameterNode(None)

    def onSceneClosing(self):
        """The parameter node goes with the scene (a new one is made at EndClose); so do the results."""
        self.setParameterNode(None)
        self.controller.scene_closed()

    def onSceneLoaded(self, caller=None, event=None):
        """A scene was closed or loaded: its parameter node (reference, model, k, ...) takes over."""
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.controller.entered(self.inputs())

    def initializeParameterNode(self):
        self.setParameterNode(SimilarPatientsParameterNode(self.logic.getParameterNode()))
        if self._parameterNode.volume is None:
            self._parameterNode.volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        """Bind the widgets to ``parameterNode`` (None: unbind): volume, k, metric and filters."""
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)

    def inputs(self):
        """What the widgets hold, for the controller."""
        ui, saved = self.ui, self._parameterNode
        segment = ui.segmentSelector.currentSegmentID() or None
        return Inputs(
            reference=ui.referenceComboBox.currentText or (saved.reference if saved else ""),
            model=ui.modelComboBox.currentText or (saved.model if saved else ""),
            k=ui.kSpinBox.value,
            metric=ui.metricComboBox.currentText,
            filters=ui.filterLineEdit.text,
            similar_by=similar_by_choice(ui.similarByComboBox.currentText),
            patient=ui.patientLineEdit.text,
            volume=ui.volumeSelector.currentNode(),
            tumor=ui.segmentSelector.currentNode() if segment else ui.pointSelector.currentNode(),
            segment=segment,
            selected_rows=sorted({index.row() for index in ui.resultsTable.selectedIndexes()}),
        )

    def onReferenceChosen(self, name):
        if not self._populating:
            self.controller.reference_chosen(self.inputs())

    def onModelChosen(self, model):
        """The user's (or the saved) reference and model go into the parameter node; the model is loaded."""
        if self._populating:
            return
        if self._parameterNode is not None and model:
            self._parameterNode.reference = self.ui.referenceComboBox.currentText
            self._parameterNode.model = model
        self.ui.weightsPathLineEdit.currentPath = self.logic.settings.weights_file(model) or ""
        self.controller.prepare(self.inputs())

    def onBigQueryReferencesEdited(self):
        self.controller.bigquery_references_edited(self.ui.bigQueryLineEdit.text, self.inputs())
        self.ui.bigQueryLineEdit.text = "; ".join(self.logic.settings.bigquery_references)

    def updateCacheInfo(self, collapsed=False):
        if not collapsed:
            self.ui.cacheInfoLabel.text = self.controller.cache_info()

    # --- what the controller asks (its View) -----------------------------------------------------------

    def ask(self, question, title):
        return slicer.util.confirmOkCancelDisplay(question, title)

    def show_error(self, message):
        slicer.util.errorDisplay(message)

    def show_status(self, text):
        self.ui.statusLabel.text = text

    def show_progress(self, title):
        """The in-panel bar and log: shown at the first task and kept; at rest between tasks."""
        bar = self.ui.progressBar
        bar.visible = self.ui.logTextEdit.visible = True
        if title is not None:
            self.ui.logTextEdit.clear()
            self.update_progress(None, title)
        else:
            bar.setRange(0, 100)
            bar.value = 0
            bar.format = "ready"

    def update_progress(self, fraction, message):
        bar = self.ui.progressBar
        bar.setRange(0, 0 if fraction is None else 100)  # 0 to 0: busy, still shown
        bar.value = 0 if fraction is None else int(100 * fraction)
        bar.format = message.replace("%", "%%") + ("" if fraction is None else "  (%p%)")

    def log(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def show_running(self, action, cancelling=False):
        cancel = "Cancelling…" if cancelling else "Cancel"
        for name, text in self.actionTexts.items():
            getattr(self.ui, ACTION_WIDGETS[name]).text = cancel if name == action else text

    def enable(self, actions):
        for action, enabled in actions.items():
            getattr(self.ui, ACTION_WIDGETS[action]).enabled = enabled

    def show_references(self, names, current):
        self.refill(self.ui.referenceComboBox, names, current, {})

    def show_models(self, names, current, tooltips):
        self.refill(self.ui.modelComboBox, names, current, tooltips)
        self.onModelChosen(self.ui.modelComboBox.currentText)

    def show_similar_by(self, names, tooltips):
        """The "Similar with respect to" choices of the reference: appearance first, then its labels."""
        self.refill(self.ui.similarByComboBox, names, self.ui.similarByComboBox.currentText, tooltips)

    def refill(self, comboBox, items, current, tooltips):
        """Replace ``comboBox``'s items (the signals this emits are not the user's choice)."""
        self._populating = True
        try:
            comboBox.clear()
            comboBox.addItems(items)
            for index, item in enumerate(items):
                comboBox.setItemData(index, tooltips.get(item, ""), qt.Qt.ToolTipRole)
            if current:
                comboBox.currentText = current
        finally:
            self._populating = False

    def show_results(self, table):
        widget = self.ui.resultsTable
        widget.clear()
        widget.setColumnCount(len(table.titles))
        widget.setRowCount(len(table.rows))
        widget.setHorizontalHeaderLabels(table.titles)
        for row, cells in enumerate(table.rows):
            for column, text in enumerate(cells):
                widget.setItem(row, column, qt.QTableWidgetItem(text))
        widget.resizeColumnsToContents()
        self.ui.queryThumbnailLabel.visible = False

    def show_thumbnails(self, query, matches):
        if query:
            self.ui.queryThumbnailLabel.setPixmap(qt.QPixmap(query))
        self.ui.queryThumbnailLabel.visible = bool(query)
        self.ui.resultsTable.setIconSize(qt.QSize(64, 64))
        for row, picture in matches.items():
            self.ui.resultsTable.item(row, 0).setIcon(qt.QIcon(picture))
            self.ui.resultsTable.setRowHeight(row, 68)

    def show_sample(self, volume, tumor):
        self.ui.volumeSelector.setCurrentNode(volume)
        self.ui.segmentSelector.setCurrentNode(None)  # the point marks the tumor
        self.ui.pointSelector.setCurrentNode(tumor)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(tumor.GetID(), 0, True)

    def show_downloads_allowed(self, allowed):
        self.ui.allowDownloadsCheckBox.checked = allowed

    def show_bigquery_allowed(self, allowed):
        box = self.ui.allowBigQueryCheckBox
        wasBlocked = box.blockSignals(True)  # the controller decided it: no second allow_bigquery call
        box.checked = allowed
        box.blockSignals(wasBlocked)

    def restart(self):
        slicer.util.restart()

    def onPipOutput(self, line):
        """pip's progress in the progress display; Slicer repaints between lines (as slicer.util.pip_install)."""
        if line.strip():
            self.update_progress(None, line.strip()[:100])
        slicer.app.processEvents()

    def open_url(self, url):
        qt.QDesktopServices.openUrl(qt.QUrl(url))


class SimilarPatientsLogic(ScriptedLoadableModuleLogic, ModuleLogic):
    """The library as the module and the Python console use it (``SimilarPatientsLib.ui.logic``), with the
    application settings of Slicer."""

    def __init__(self, home=None, python=None, settings=None):
        ScriptedLoadableModuleLogic.__init__(self)
        ModuleLogic.__init__(self, ModuleSettings(settings if settings is not None else qt.QSettings()), home, python)

    def findSimilar(self, volumeNode, tumorNode, segmentId=None, model="CTFM", reference="nlst-sybil", k=5, **options):
        """The ``k`` reference patients nearest to the tumor marked by ``tumorNode`` (a segmentation:
        ``segmentId``, or each of its segments; a point list: each point; an ROI) in ``volumeNode``, as the
        library's hit table. ``options``: metric, where, progress, cancelled. Load them with :meth:`loadMatches`."""
        return self.find_similar(volumeNode, tumorNode, segmentId, model, reference, k, **options)

    def loadMatches(self, hits, queryVolume=None, queryCentreLps=None, progress=None):
        """The matches' series (cache, the site's DICOM folder, or IDC) beside the query (default: the last)."""
        return self.load_matches(hits, queryVolume, queryCentreLps, progress)


class SimilarPatientsTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test (``SimilarPatientsLib/ui/self_test.py``): temporary folders and DICOM database only."""

    def setUp(self):
        """The search packages, installed (with one plan) if missing; under --testing (the extensions build
        machine) Slicer's Python is never changed: the test is skipped, saying what is missing."""
        slicer.mrmlScene.Clear()
        if dependencies.plan(dependencies.SEARCH).empty:
            return
        needed = dependencies.plan(*dependencies.companions(bigquery_allowed=False))  # the module's one plan
        missing = ", ".join(r.pip for r in needed.packages)
        if slicer.app.testingEnabled():
            self.skipTest(f"Testing mode (--testing) installs nothing into Slicer's Python; missing: {missing}")
        installer = dependencies.SlicerInstaller()
        if installer.resolve(needed).replaces:
            self.fail(f"Installing {missing} would replace packages Slicer has loaded: install them, restart, rerun.")
        installer.install(needed)

    def runTest(self):
        self.setUp()
        self.test_neighbors_through_logic()
        self.setUp()
        self.test_query_from_image_through_logic()

    def test_neighbors_through_logic(self):
        self_test.neighbors_through_logic()
        logging.info("SimilarPatients: search by patient passed")

    def test_query_from_image_through_logic(self):
        self_test.query_and_load_through_logic()
        logging.info("SimilarPatients: image query and load passed")
