"""The Slicer module's widget state and Logic on a real MRML scene. The module needs Slicer's
Qt application, which slicer-core lacks: ``qt``, the scripted-module base classes and the
parameter node wrapper are stood in for, and the widget's UI is a mock; what is tested here
is the module's own bookkeeping over real nodes."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk

from MultiModalAnalysisLib import mrml
from MultiModalAnalysisLib.errors import MMAError

pytest.importorskip("slicer", reason="needs the slicer-core wheel (test extra)")

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiModalAnalysis"


def _stand_ins() -> dict[str, types.ModuleType]:
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, parent=None: None}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args, **kwargs: None
    return {"qt": mock.MagicMock(), "slicer.ScriptedLoadableModule": scripted,
            "slicer.parameterNodeWrapper": wrapper}


@pytest.fixture(scope="module")
def module():
    """MultiModalAnalysis.py loaded with the stand-ins, which leave sys.modules after (what
    the module imported stays: numpy and others cannot be imported twice)."""
    import slicer
    import vtk

    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        with mock.patch.object(sys, "path", [str(MODULE_DIR), *sys.path]), mock.patch.object(
            slicer, "vtkCommand", vtk.vtkCommand, create=True
        ):
            spec = importlib.util.spec_from_file_location(
                "MultiModalAnalysis", MODULE_DIR / "MultiModalAnalysis.py")
            loaded = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded)
            yield loaded
    finally:
        for name, before in saved.items():
            if before is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before


def _volume(scene, value: float, name: str):
    ramp = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10) % 7
    image = sitk.GetImageFromArray(value + ramp)
    return mrml.volume_node_from_image(image, scene, name)


def _parameters(scene, reference, **kw):
    """A stand-in parameter node holding what the Logic reads."""
    p = mock.MagicMock()
    p.parameterNode = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "parameters")
    p.referenceVolume, p.referenceModality = reference, "CT"
    p.inputVolumes, p.inputModalities, p.inputLandmarks = [], [], []
    p.referenceLandmarks = p.featuresMask = p.outputSegmentation = None
    p.segmentationMask = p.outputFeatures = None
    p.preprocess, p.registrationType, p.registrationMetric, p.device = False, "rigid", "auto", "cpu"
    p.fusionMethod, p.segmentationMethod, p.segmentationClasses = "", "threshold", 2
    p.segmentationModel = p.featureSettings = p.classifierModel = Path(".")
    p.show3D, p.caseId = False, ""
    for key, value in kw.items():
        setattr(p, key, value)
    return p


def _widget(module, p):
    widget = module.MultiModalAnalysisWidget()
    widget.ui, widget.inputsTable = mock.MagicMock(), mock.MagicMock()
    widget.logic = module.MultiModalAnalysisLogic()
    widget.parent = mock.MagicMock(isEntered=False)
    widget._parameterNode = p
    return widget


def _finish_run(widget, stages):
    """What the widget does when a run of ``stages`` ends."""
    steps, widget._state = widget.logic.workflow(widget._parameterNode, stages)
    for _, factory in steps:
        task = factory()
        task.publish(task.compute(None, None))
    widget._runner = mock.MagicMock(cancelled=False, error=None, outputs=[])
    widget._timer = mock.MagicMock()
    widget._finish()


def test_closing_the_scene_forgets_the_volumes_the_next_step_would_start_from(
    module, mrml_scene
):
    ct = _volume(mrml_scene, 100.0, "patient A CT")
    widget = _widget(module, _parameters(mrml_scene, ct))
    _finish_run(widget, ("segment",))
    assert widget._currentVolumes is not None

    widget.onSceneStartClose(None, None)
    mrml_scene.Clear(0)
    widget.onSceneEndClose(None, None)
    assert widget._currentVolumes is None and widget._unregisteredVolumes is None


def test_a_reference_changed_by_any_route_forgets_the_carried_volumes(module, mrml_scene):
    first, second = _volume(mrml_scene, 100.0, "CT A"), _volume(mrml_scene, 900.0, "CT B")
    p = _parameters(mrml_scene, first)
    widget = _widget(module, p)
    _finish_run(widget, ("segment",))
    widget.onParameterNodeModified()  # an unrelated change keeps them
    assert widget._currentVolumes is not None

    p.referenceVolume = second  # e.g. set from the Python console or a loaded scene
    widget.onParameterNodeModified()
    assert widget._currentVolumes is None


def test_the_status_line_names_the_file_a_batch_kept_its_rows_in(module, mrml_scene,
                                                                tmp_path):
    # (the rows written case by case survive a cancel; their file was named only in the log)
    ct = _volume(mrml_scene, 100.0, "CT")
    widget = _widget(module, _parameters(mrml_scene, ct))
    rows = tmp_path / "batch-1.csv"

    def batch(p):
        widget.logic.lastBatchFile = str(rows)
        rows.write_text("case_id\nSTS_001\n")
        return mock.MagicMock()

    widget.logic.batch = batch
    for cancelled in (True, False):
        widget._batchTask()
        widget._runner = mock.MagicMock(cancelled=cancelled, error=None, outputs=["batch"])
        widget._timer = mock.MagicMock()
        widget._finish()
        assert f"Rows in {rows}." in widget.ui.statusLabel.text
        assert widget.ui.statusLabel.text.startswith("Cancelled." if cancelled else "Done")
    widget._runner = mock.MagicMock(cancelled=False, error=None, outputs=["segment"])
    widget._finish()  # a run that was no batch names no file
    assert "Rows in" not in widget.ui.statusLabel.text


def test_the_logic_refuses_volumes_of_a_closed_scene(module, mrml_scene):
    old = _volume(mrml_scene, 100.0, "patient A CT")
    mrml_scene.Clear(0)
    new = _volume(mrml_scene, 900.0, "patient B CT")
    p = _parameters(mrml_scene, new)
    with pytest.raises(MMAError, match="no longer in the scene"):
        module.MultiModalAnalysisLogic().workflow(p, ("segment",), [(old, "CT")])


def test_the_first_reference_offered_is_a_scalar_volume_not_a_labelmap(module, mrml_scene):
    mask = sitk.Image((10, 8, 6), sitk.sitkUInt8)
    mrml.volume_node_from_image(mask, mrml_scene, "mask", labelmap=True)
    ct = _volume(mrml_scene, 100.0, "CT")
    assert module.MultiModalAnalysisLogic.firstScalarVolume(mrml_scene) is ct


def test_the_fields_of_view_of_a_registration_go_with_its_volumes_to_the_next_step(
    module, mrml_scene
):
    ct, pet = _volume(mrml_scene, 100.0, "CT"), _volume(mrml_scene, 5.0, "PET")
    points = np.array([[0.0, 0, 0], [8, 0, 2], [0, 6, 4], [4, 2, 5]])
    p = _parameters(mrml_scene, ct, inputVolumes=[pet], inputModalities=["PET"],
                    registrationType="landmarks",
                    referenceLandmarks=mrml.markups_from_points(points, mrml_scene, "on CT"))
    p.inputLandmarks = [mrml.markups_from_points(points, mrml_scene, "on PET").GetID()]
    widget = _widget(module, p)
    _finish_run(widget, ("register",))
    assert set(widget._fieldsOfView) == {"PET"}

    _, state = widget.logic.workflow(p, ("segment",), widget._currentVolumes,
                                     widget._unregisteredVolumes, widget._fieldsOfView)
    assert state.fields_of_view["PET"] is widget._fieldsOfView["PET"]


def test_the_prediction_label_names_the_segment_of_each_row(module, mrml_scene):
    import pandas as pd

    one = pd.DataFrame({"segment": ["GTV"], "label": ["LungMets = 1"], "probability": [0.83]})
    assert module.MultiModalAnalysisLogic.predictionText(
        mrml.table_node_from_dataframe(one, mrml_scene)) == "LungMets = 1 (probability 0.83)"
    two = pd.DataFrame({"segment": ["GTV", "necrosis"], "label": ["LungMets = 1", "LungMets = 0"],
                        "probability": [0.83, 0.2]})
    assert module.MultiModalAnalysisLogic.predictionText(
        mrml.table_node_from_dataframe(two, mrml_scene)) == (
        "GTV: LungMets = 1 (probability 0.83); necrosis: LungMets = 0 (probability 0.20)")
