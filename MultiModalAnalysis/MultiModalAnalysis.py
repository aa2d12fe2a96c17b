"""MultiModalAnalysis: one guided module from CT / PET / MR volumes to a prediction.

Module (metadata), Widget (the .ui bound to a parameter node; runs the work in the background
with a progress bar and Cancel), Logic (parameter node -> engine steps over nodes) and Test
(the whole workflow on the bundled patient). The engine, node-level logic included, lives in
``MultiModalAnalysisLib`` and runs without Slicer; the Slicer-only helpers are in
``MultiModalAnalysisSlicerLib``.
"""

import logging
import os
import sys
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _makeEngineImportable():
    """In a build or install tree the engine sits next to this file; when the module is run
    from a source checkout (Slicer's "additional module paths" set to this folder) it is in
    the repository root, one level up."""
    try:
        import MultiModalAnalysisLib  # noqa: F401
    except ModuleNotFoundError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(root, "MultiModalAnalysisLib")) and root not in sys.path:
            sys.path.append(root)


_makeEngineImportable()

from MultiModalAnalysisSlicerLib import views  # noqa: E402
from MultiModalAnalysisSlicerLib.inputs import InputVolumesTable, guessNodeModality  # noqa: E402
from MultiModalAnalysisSlicerLib.install import DependencyInstaller  # noqa: E402
from MultiModalAnalysisSlicerLib.parameters import MultiModalAnalysisParameterNode  # noqa: E402

from MultiModalAnalysisLib import mrml  # noqa: E402
from MultiModalAnalysisLib.errors import MMAError  # noqa: E402
from MultiModalAnalysisLib.jobs import StepRunner  # noqa: E402
from MultiModalAnalysisLib.workflow import (  # noqa: E402
    STAGES,
    WorkflowSettings,
    batch_task,
    workflow_steps,
)


def moduleResourcePath(relativePath: str) -> str:
    """A resource (``UI/...``, ``Icons/...``): next to this file in build and install trees
    (<qt-scripted-modules>/Resources), at the repository root in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.path.join(here, "Resources"), os.path.join(os.path.dirname(here), "Resources")):
        candidate = os.path.join(base, relativePath)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(here, "Resources", relativePath)


def _given(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# Module
#


class MultiModalAnalysis(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Multi-Modal Analysis"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["MultiModalAnalysis developers"]
        self.parent.helpText = (
            "Multi-modal CT / PET / MR analysis in one guided workflow: preprocessing, "
            "registration and fusion, segmentation, IBSI radiomics features and outcome "
            "classification. Choose a reference volume and any further volumes with their "
            "modality, then run the steps one by one or all at once. Long steps run in the "
            "background: Slicer stays usable and Cancel stops them. "
            '<a href="https://github.com/MultiModalAnalysis/SlicerMultiModalAnalysis">'
            "Documentation</a>."
        )
        self.parent.icon = qt.QIcon(moduleResourcePath("Icons/MultiModalAnalysis.png"))
        self.parent.acknowledgementText = (
            "The bundled sample patient comes from the IBSI validation data (TCIA "
            "Soft-tissue-Sarcoma collection, CC BY 3.0; Vallieres et al., Phys Med Biol 2015)."
        )


#
# Widget
#


class MultiModalAnalysisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and runs steps without blocking Slicer."""

    _actionButtons = (
        "preprocessButton",
        "registerButton",
        "fuseButton",
        "segmentButton",
        "extractFeaturesButton",
        "classifyButton",
        "runAllButton",
        "runBatchButton",
    )

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None
        self._state = None
        self._currentVolumes = None  # what the next single step works on
        self._unregisteredVolumes = None  # what the next Register starts from
        self._fieldsOfView = None  # where each of the registered ones has data
        self._carriedReference = None  # the reference volume those were made from
        self._startedAt = 0.0
        self._batchFile = None  # the CSV the running batch writes its rows to
        self._deviceChecked = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(moduleResourcePath("UI/MultiModalAnalysis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MultiModalAnalysisLogic()
        self.inputsTable = InputVolumesTable(self.ui.inputVolumesTable, self.onInputsEdited)

        # Engine work runs in a worker thread; this timer publishes its progress and results.
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addInputButton.clicked.connect(self.inputsTable.addRow)
        self.ui.removeInputButton.clicked.connect(self.inputsTable.removeSelectedRow)
        self.ui.guessModalitiesButton.clicked.connect(self.onGuessModalities)
        # nodeActivated: only a user's choice, not a scene being restored, triggers a guess.
        self.ui.referenceVolumeSelector.connect(
            "nodeActivated(vtkMRMLNode*)", self.onReferenceChosen
        )
        self.ui.preprocessButton.clicked.connect(lambda: self.runStages(("preprocess",), True))
        self.ui.registerButton.clicked.connect(lambda: self.runStages(("register",)))
        self.ui.fuseButton.clicked.connect(lambda: self.runStages(("fuse",)))
        self.ui.segmentButton.clicked.connect(lambda: self.runStages(("segment",)))
        self.ui.extractFeaturesButton.clicked.connect(lambda: self.runStages(("features",)))
        self.ui.classifyButton.clicked.connect(lambda: self.runStages(("classify",)))
        self.ui.runAllButton.clicked.connect(lambda: self.runStages(STAGES, fresh=True))
        self.ui.runBatchButton.clicked.connect(self.onRunBatch)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.showFusedButton.clicked.connect(self.onShowFused)
        self.ui.registerCollapsibleButton.contentsCollapsed.connect(self.onRegisterExpanded)

        self.initializeParameterNode()

    def cleanup(self):
        self.onCancel()
        self.removeObservers()
        self._timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, slicer.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.forgetCarriedVolumes()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.forgetCarriedVolumes()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def forgetCarriedVolumes(self):
        """The next single step starts from the inputs again (scene closed, reference changed)."""
        self._currentVolumes = self._unregisteredVolumes = self._fieldsOfView = None
        self._carriedReference = None

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            first = self.logic.firstScalarVolume(slicer.mrmlScene)
            if first:
                self._parameterNode.referenceVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, slicer.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, slicer.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        if self._carriedReference is not None and p.referenceVolume is not self._carriedReference:
            self.forgetCarriedVolumes()  # a new reference, chosen by any route
        self.inputsTable.setRows(
            list(p.inputVolumes), list(p.inputModalities), self.logic.inputLandmarks(p)
        )
        self.updateButtonStates()

    def updateButtonStates(self):
        p = self._parameterNode
        running = self._runner is not None
        hasReference = p is not None and p.referenceVolume is not None
        hasFurther = p is not None and len(p.inputVolumes) > 0
        enabled = {
            "preprocessButton": hasReference,
            "registerButton": hasReference and hasFurther,
            "fuseButton": hasReference and hasFurther,
            "segmentButton": hasReference,
            "extractFeaturesButton": hasReference,
            "classifyButton": p is not None
            and p.outputFeatures is not None
            and _given(p.classifierModel),
            "runAllButton": hasReference,
            "runBatchButton": p is not None and _given(p.batchFolder),
        }
        for name in self._actionButtons:
            getattr(self.ui, name).enabled = enabled[name] and not running
        self.ui.cancelButton.enabled = running
        self.ui.showFusedButton.enabled = hasReference and p.fusedForeground is not None

    # ------------------------------------------------------------------ inputs

    def onInputsEdited(self, volumes, modalities, landmarks):
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.inputVolumes = volumes
            self._parameterNode.inputModalities = modalities
            self._parameterNode.inputLandmarks = [n.GetID() if n else "" for n in landmarks]
        self.forgetCarriedVolumes()

    def onReferenceChosen(self, node):
        if node is not None and self._parameterNode is not None:
            self._parameterNode.referenceModality = guessNodeModality(node)
        self.forgetCarriedVolumes()

    def onGuessModalities(self):
        if self._parameterNode and self._parameterNode.referenceVolume:
            self._parameterNode.referenceModality = guessNodeModality(
                self._parameterNode.referenceVolume
            )
        self.inputsTable.guessAll()

    def onRegisterExpanded(self, collapsed):
        if not collapsed and not self._deviceChecked:
            self._deviceChecked = True
            self.ui.deviceLabel.text = self.logic.detectedDevice()

    # ------------------------------------------------------------------ running

    def runStages(self, stages, fresh=False):
        """Build the steps of ``stages`` and start them in the background."""
        if self._runner is not None:
            return
        with slicer.util.tryWithErrorDisplay(
            "MultiModalAnalysis could not start.", waitCursor=True
        ):
            self.logic.installer.ensure()
            if not self._deviceChecked:
                self._deviceChecked = True
                self.ui.deviceLabel.text = self.logic.detectedDevice()
            volumes = None if fresh else self._currentVolumes
            unregistered = None if fresh else self._unregisteredVolumes
            fieldsOfView = None if fresh else self._fieldsOfView
            steps, self._state = self.logic.workflow(
                self._parameterNode, stages, volumes, unregistered, fieldsOfView
            )
            if not steps:
                raise MMAError("nothing to run: the chosen step is switched off in its settings.")
            if "register" in stages:
                self._parameterNode.outputTransforms = []
                self._parameterNode.registeredVolumes = []
            self._start(StepRunner(steps, on_published=self.onStepPublished))

    def onRunBatch(self):
        if self._runner is not None:
            return
        with slicer.util.tryWithErrorDisplay(
            "MultiModalAnalysis could not start the batch.", waitCursor=True
        ):
            self.logic.installer.ensure()
            self._state = None
            self._batchFile = None
            self._start(
                StepRunner(
                    [("batch", self._batchTask)],
                    on_published=self.onStepPublished,
                )
            )

    def _batchTask(self):
        task = self.logic.batch(self._parameterNode)
        self._batchFile = self.logic.lastBatchFile  # (named when the batch ends)
        return task

    def _batchFileText(self):
        """ " Rows in <file>." when a batch wrote rows (kept after a cancel or a failure)."""
        path, self._batchFile = self._batchFile, None
        return f" Rows in {path}." if path and os.path.isfile(path) else ""

    def _start(self, runner):
        self._runner = runner
        self._startedAt = time.perf_counter()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        self.updateButtonStates()
        self._timer.start()

    def onPoll(self):
        runner = self._runner
        if runner is None:
            self._timer.stop()
            return
        # Waiting a little here hands the GIL to the worker even where the event loop holds it.
        done = runner.poll(0.02)
        fraction, message = runner.progress
        self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message
        if done:
            self._finish()

    def _finish(self):
        runner, self._runner = self._runner, None
        self._timer.stop()
        elapsed = time.perf_counter() - self._startedAt
        if self._state is not None:
            self._carriedReference = self._parameterNode.referenceVolume
            self._currentVolumes = [
                (node, modality) for modality, node in self._state.volumes.items()
            ]
            self._unregisteredVolumes = [
                (node, modality) for modality, node in self._state.unregistered.items()
            ]
            self._fieldsOfView = dict(self._state.fields_of_view)
        self.updateButtonStates()
        written = self._batchFileText()
        if runner.cancelled:
            self.ui.statusLabel.text = "Cancelled." + written
            return
        if runner.error is not None:
            self.ui.statusLabel.text = f"Failed: {runner.error}{written}"
            with slicer.util.tryWithErrorDisplay("MultiModalAnalysis failed.", waitCursor=False):
                raise runner.error
            return
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = (
            f"Done in {elapsed:.1f} s ({', '.join(runner.outputs)}).{written}"
        )

    def onCancel(self):
        if self._runner is not None:
            self._runner.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def onStepPublished(self, name, published):
        """Keep each output in the parameter node and show it."""
        p = self._parameterNode
        kind = name.split()[0]
        if kind == "register":
            p.outputTransforms.append(published.transform_node)
            p.registeredVolumes.append(published.warped_node)
            p.fusedForeground = published.warped_node
            views.showFused(p.referenceVolume, published.warped_node, p.fusedOpacity)
        elif kind == "fuse":
            p.outputFused = published
            slicer.util.setSliceViewerLayers(background=published, fit=True)
        elif kind == "segment":
            p.outputSegmentation = published.segmentation_node
            views.showSegmentation(published.segmentation_node, p.referenceVolume, p.show3D)
        elif kind in ("features", "batch"):
            p.outputFeatures = published
            views.showTable(published)
        elif kind == "classify":
            p.outputPrediction = published
            self.ui.predictionLabel.text = self.logic.predictionText(published)
            views.showTable(published)

    def onShowFused(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not show the fused views.", waitCursor=False):
            views.showFused(p.referenceVolume, p.fusedForeground, p.fusedOpacity)


#
# Logic
#


class MultiModalAnalysisLogic(ScriptedLoadableModuleLogic):
    """Parameter node -> engine steps over nodes. The steps themselves (``workflow``,
    ``nodes``) are in the engine and run without Slicer; only what needs the application is
    here: the parameter node, dependency installation, device display, blocking runs."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.installer = DependencyInstaller()
        self.lastBatchFile = None  # the CSV the last batch writes its rows to

    def getParameterNode(self):
        return MultiModalAnalysisParameterNode(super().getParameterNode())

    @staticmethod
    def settings(p) -> WorkflowSettings:
        """The engine's settings from the parameter node."""
        return WorkflowSettings(
            preprocess=p.preprocess,
            registration_type=p.registrationType,
            registration_metric=p.registrationMetric,
            device=p.device,
            fusion_method=p.fusionMethod,
            segmentation_method=p.segmentationMethod,
            segmentation_classes=p.segmentationClasses,
            segmentation_model=str(p.segmentationModel) if _given(p.segmentationModel) else "",
            show_3d=p.show3D,
            feature_settings=str(p.featureSettings) if _given(p.featureSettings) else "",
            classifier=str(p.classifierModel) if _given(p.classifierModel) else "",
            case_id=p.caseId,
        )

    @staticmethod
    def inputs(p) -> list:
        """(volume node, modality) pairs, the reference first."""
        # A hand-edited parameter node may hold fewer modalities than volumes: pad with "other".
        modalities = list(p.inputModalities) + ["other"] * len(p.inputVolumes)
        pairs = [(p.referenceVolume, p.referenceModality)]
        pairs += [(n, m) for n, m in zip(p.inputVolumes, modalities, strict=False) if n]
        return pairs

    @staticmethod
    def inputLandmarks(p) -> list:
        """The point-list node (or None) of each further volume, as ``p.inputVolumes``."""
        ids = list(p.inputLandmarks) + [""] * len(p.inputVolumes)
        scene = p.parameterNode.GetScene() or slicer.mrmlScene
        return [scene.GetNodeByID(i) if i else None for i in ids[: len(p.inputVolumes)]]

    def landmarks(self, p) -> list:
        """The point list (or None) of each of :meth:`inputs`, the reference first."""
        further = self.inputLandmarks(p)
        return [p.referenceLandmarks] + [
            points for n, points in zip(p.inputVolumes, further, strict=False) if n
        ]

    def workflow(self, p, stages, volumes=None, unregistered=None, fieldsOfView=None):
        """Steps for ``stages`` over the inputs (or the volumes a previous step produced;
        a registration starts from ``unregistered``, the volumes before any was registered;
        ``fieldsOfView``: where each registered one has data)."""
        if p.referenceVolume is None:
            raise MMAError("choose a reference volume in Inputs first.")
        self._refuseClosedSceneNodes(p, volumes, unregistered)
        mask = p.featuresMask or p.outputSegmentation
        if "segment" in stages:
            mask = p.featuresMask  # the new segmentation will be measured
        settings = self.settings(p)
        if tuple(stages) == ("preprocess",):
            settings.preprocess = True  # the Preprocess button applies the presets regardless
        # The volumes of a previous step come in the order of the inputs (reference first),
        # and sit where the inputs do: the landmarks clicked on the inputs apply to them.
        steps, state = workflow_steps(
            volumes or self.inputs(p), settings, mask_node=mask,
            segmentation_mask=p.segmentationMask, stages=stages,
            landmarks=self.landmarks(p), unregistered=unregistered,
            fields_of_view=fieldsOfView,
        )
        if "classify" in stages and "features" not in stages:
            state.features = p.outputFeatures
            if state.features is None:
                raise MMAError("extract features first: the classifier reads the features table.")
        return steps, state

    @staticmethod
    def _refuseClosedSceneNodes(p, volumes, unregistered):
        """Volumes of a previous run that are no longer in the scene (it was closed, or they
        were deleted, since) must not be worked on: they may be the previous patient's."""
        scene = p.parameterNode.GetScene() or slicer.mrmlScene
        carried = list(volumes or ()) + list(unregistered or ())
        if any(node is not None and node.GetScene() is not scene for node, _ in carried):
            raise MMAError(
                "the volumes of the previous step are no longer in the scene (it was closed, "
                "or they were deleted, since): run the steps again from the inputs (Run all)."
            )

    @staticmethod
    def firstScalarVolume(scene):
        """The first plain scalar volume of ``scene`` (not a labelmap), or None."""
        for node in scene.GetNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetClassName() == "vtkMRMLScalarVolumeNode":
                return node
        return None

    def batch(self, p):
        """A task running the pipeline over every case folder of ``p.batchFolder``."""
        folder = str(p.batchFolder)
        cases = sorted(
            os.path.join(folder, d)
            for d in os.listdir(folder)
            if os.path.isdir(os.path.join(folder, d))
        )
        modalities = [m for _, m in self.inputs(p)]
        # The rows are also written as each case is done (a crash keeps them); the status
        # line names the file when the batch ends (done, cancelled or failed), and the table
        # node names it in its attribute.
        output = os.path.join(
            slicer.app.temporaryPath, "MultiModalAnalysis",
            f"batch-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        self.lastBatchFile = output
        return batch_task(
            cases,
            self.settings(p),
            modalities=modalities,
            mask_name=p.batchMaskName or None,
            scene=slicer.mrmlScene,
            output=output,
        )

    def run(self, p, stages=STAGES, volumes=None, unregistered=None, fieldsOfView=None):
        """Run steps to the end, keeping Slicer responsive (for the self-test and scripts)."""
        self.installer.ensure()
        steps, state = self.workflow(p, stages, volumes, unregistered, fieldsOfView)
        runner = StepRunner(steps)
        while not runner.poll(0.05):
            slicer.app.processEvents()
        if runner.error is not None:
            raise runner.error
        return state

    @staticmethod
    def detectedDevice() -> str:
        """What ``device="auto"`` will use, for the Register section."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return "PyTorch not installed yet (it is installed on first use)"
        try:
            from MultiModalAnalysisLib.device import describe_device

            return describe_device("auto")
        except Exception as error:  # a broken torch install must not break the module
            logging.warning("MultiModalAnalysis: could not query the compute device: %s", error)
            return f"unknown ({error})"

    @staticmethod
    def predictionText(tableNode) -> str:
        """ "LungMets = 1 (probability 0.83)" for a prediction table of one row; with several
        rows (one per region measured), each is named by its segment."""
        frame = mrml.dataframe_from_table_node(tableNode)
        texts = [f"{row['label']} (probability {float(row['probability']):.2f})"
                 for _, row in frame.iterrows()]
        if len(texts) <= 1:
            return "".join(texts)
        names = frame["segment"] if "segment" in frame.columns else frame.index + 1
        return "; ".join(f"{name}: {text}" for name, text in zip(names, texts, strict=True))


#
# Test
#


class MultiModalAnalysisTest(ScriptedLoadableModuleTest):
    """The whole workflow on the bundled patient (STS_002), with numbers asserted."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WholeWorkflowOnBundledPatient()
        self.setUp()
        self.test_RegistrationByLandmarks()

    def test_WholeWorkflowOnBundledPatient(self):
        import numpy as np
        import SimpleITK as sitk

        from MultiModalAnalysisLib.case import load_case
        from MultiModalAnalysisLib.metrics import dice, transform_distance
        from MultiModalAnalysisLib.preprocess import resample_to_reference
        from MultiModalAnalysisLib.sample_data import sample_case_dir

        self.delayDisplay("Loading the bundled patient, MR moved by a known rigid transform")
        case = load_case(sample_case_dir())
        ct = case.image("CT")
        truth = _knownMove(ct)
        scene = slicer.mrmlScene
        ctNode = mrml.volume_node_from_image(ct, scene, "CT")
        petNode = mrml.volume_node_from_image(case.image("PET"), scene, "PET")
        mrNode = mrml.volume_node_from_image(
            _movedRigidly(case.image("MR_T1"), truth), scene, "MR T1"
        )
        mrMask = mrml.volume_node_from_image(
            _movedRigidly(case.mask("MR_T1_mask"), truth), scene, "MR GTV", labelmap=True
        )
        gtv = mrml.segmentation_node_from_labels(
            case.mask("CT_mask"), scene, names={1: "GTV"}, reference_node=ctNode, name="expert GTV"
        )

        logic = MultiModalAnalysisLogic()
        p = logic.getParameterNode()
        p.referenceVolume = ctNode
        p.referenceModality = "CT"
        p.inputVolumes = [petNode, mrNode]
        p.inputModalities = ["PET", "MR-T1"]
        p.preprocess = False
        p.registrationType = "rigid"
        p.segmentationMethod = "gmm"
        p.segmentationClasses = 3
        p.show3D = False
        p.featuresMask = gtv
        p.caseId = "STS_002"

        self.delayDisplay("Running register, fuse, segment and features")
        state = logic.run(p, ("register", "fuse", "segment", "features"))

        # Registration: the recovered MR transform matches the known move inside the tumour.
        # The dataset's own MR-CT alignment is off by millimetres (its authors registered the
        # MR), so the reference is the engine's registration of the unmoved MR, then the move.
        from MultiModalAnalysisLib.registration import register
        from MultiModalAnalysisLib.registration.transforms import compose

        recovered = mrml.transform_from_transform_node(state.transforms["MR_T1"])
        tumour = sitk.GetArrayFromImage(case.mask("CT_mask")) > 0
        points = [
            ct.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]])
            for idx in np.argwhere(tumour)[::50]
        ]
        unmoved = register(ct, case.image("MR_T1"), "rigid", fixed_modality="CT",
                           moving_modality="MR_T1").transform
        error = float(transform_distance(recovered, compose(truth, unmoved), points).mean())
        self.assertLess(error, 1.5, f"MR->CT registration error {error:.2f} mm in the tumour")

        # Dice: the moved MR tumour contour, hardened through the output transform node,
        # lands on the CT contour.
        mrMask.SetAndObserveTransformNodeID(state.transforms["MR_T1"].GetID())
        self.assertTrue(slicer.vtkSlicerTransformLogic.hardenTransform(mrMask))
        onCt = resample_to_reference(mrml.image_from_volume_node(mrMask), ct, is_label=True)
        overlap = dice(onCt, case.mask("CT_mask"))
        self.assertGreater(overlap, 0.8, f"Dice {overlap:.3f}")

        # Segmentation: named segments on the CT grid.
        names = mrml.segment_names(state.segmentation.segmentation_node)
        self.assertGreaterEqual(len(names), 2)
        self.assertTrue(all(names.values()))

        # A feature value: PET SUVmax of the GTV is a tumour's (FDG-avid sarcoma) and the table
        # holds what the engine computes from the same volumes.
        from MultiModalAnalysisLib.features import extract_features

        frame = mrml.dataframe_from_table_node(state.features)
        self.assertEqual(frame["segment"].tolist(), ["GTV"])
        images = {m: mrml.image_from_volume_node(node) for m, node in state.volumes.items()}
        expected = extract_features(images, sitk.Cast(case.mask("CT_mask") > 0, sitk.sitkUInt8))
        for name in ("PET_stat_max", "CT_stat_mean"):
            self.assertAlmostEqual(float(frame[name].iloc[0]), expected[name], places=3)
        self.assertTrue(2.0 < float(frame["PET_stat_max"].iloc[0]) < 50.0)
        self.delayDisplay(f"Test passed: registration error {error:.2f} mm, Dice {overlap:.3f}")

    def test_RegistrationByLandmarks(self):
        """Point lists chosen in the parameter node reach the registration and pair up."""
        import numpy as np
        import SimpleITK as sitk

        from MultiModalAnalysisLib.case import load_case
        from MultiModalAnalysisLib.metrics import transform_distance
        from MultiModalAnalysisLib.sample_data import sample_case_dir

        case = load_case(sample_case_dir())
        ct = case.image("CT")
        truth = _knownMove(ct)
        scene = slicer.mrmlScene
        ctNode = mrml.volume_node_from_image(ct, scene, "CT")
        mrNode = mrml.volume_node_from_image(
            _movedRigidly(case.image("MR_T1"), truth), scene, "MR T1"
        )
        tumour = np.argwhere(sitk.GetArrayFromImage(case.mask("CT_mask")) > 0)
        chosen = tumour[np.linspace(0, len(tumour) - 1, 5).astype(int)]
        points = [ct.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in chosen]
        onCt = mrml.markups_from_points(points, scene, "on CT")
        onMr = mrml.markups_from_points([truth.TransformPoint(p) for p in points], scene, "on MR")

        logic = MultiModalAnalysisLogic()
        p = logic.getParameterNode()
        p.referenceVolume = ctNode
        p.referenceModality = "CT"
        p.inputVolumes = [mrNode]
        p.inputModalities = ["MR-T1"]
        p.referenceLandmarks = onCt
        p.inputLandmarks = [onMr.GetID()]
        p.preprocess = False
        p.registrationType = "landmarks"
        state = logic.run(p, ("register",))

        recovered = mrml.transform_from_transform_node(state.transforms["MR_T1"])
        error = float(transform_distance(recovered, truth, points).max())
        self.assertLess(error, 1e-3, f"landmark registration error {error:.4f} mm")
        self.assertEqual(state.registration_metrics["MR_T1"]["landmark_pairs"], 5)
        self.delayDisplay(f"Test passed: landmark registration error {error:.1e} mm")


def _knownMove(ct):
    """About 5 degrees and 8 mm about the CT's centre: the move the self-tests undo."""
    import SimpleITK as sitk

    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    return sitk.Euler3DTransform(centre, 0.05, -0.04, 0.08, (6.0, -4.0, 3.0))


def _movedRigidly(image, rigid):
    """The same voxels placed where ``rigid`` sends them (geometry only, no resampling)."""
    import numpy as np
    import SimpleITK as sitk

    moved = sitk.Image(image)
    matrix = np.array(rigid.GetMatrix()).reshape(3, 3)
    moved.SetOrigin(rigid.TransformPoint(image.GetOrigin()))
    moved.SetDirection((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    return moved
