"""The module's parameter node: every setting of the widget, saved with the scene."""

from pathlib import Path
from typing import Annotated

from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from MultiModalAnalysisLib.modality_guess import MODALITY_CHOICES
from MultiModalAnalysisLib.workflow import REGISTRATION_TYPES

REGISTRATION_METRICS = ("auto", "mi", "ncc", "lncc")
DEVICES = ("auto", "cpu", "cuda")
FUSION_METHODS = ("average", "maximum", "checkerboard", "overlay", "laplacian", "wavelet")
SEGMENTATION_METHODS = ("gmm", "kmeans", "threshold", "model")


@parameterNodeWrapper
class MultiModalAnalysisParameterNode:
    """Inputs, settings of every step, and the outputs of the last run.

    ``inputVolumes[i]`` has modality ``inputModalities[i]`` and the landmarks (point list)
    whose node ID is ``inputLandmarks[i]``, "" for none (the widget keeps the three lists the
    same length). Paths left empty read as ``Path(".")``.
    """

    # Inputs
    referenceVolume: vtkMRMLScalarVolumeNode
    referenceModality: Annotated[str, Choice(list(MODALITY_CHOICES))] = "CT"
    inputVolumes: list[vtkMRMLScalarVolumeNode]
    inputModalities: list[str]
    referenceLandmarks: vtkMRMLMarkupsFiducialNode
    inputLandmarks: list[str]
    caseId: str = ""
    # Preprocess
    preprocess: bool = True
    # Register
    registrationType: Annotated[str, Choice(list(REGISTRATION_TYPES))] = "rigid"
    registrationMetric: Annotated[str, Choice(list(REGISTRATION_METRICS))] = "auto"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    fusedForeground: vtkMRMLScalarVolumeNode
    fusedOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # Fuse
    fusionMethod: Annotated[str, Choice(list(FUSION_METHODS))] = "average"
    # Segment
    segmentationMethod: Annotated[str, Choice(list(SEGMENTATION_METHODS))] = "gmm"
    segmentationClasses: Annotated[int, WithinRange(2, 12)] = 3
    segmentationModel: Path
    segmentationMask: vtkMRMLSegmentationNode
    show3D: bool = True
    # Features and classify
    featuresMask: vtkMRMLSegmentationNode
    featureSettings: Path
    classifierModel: Path
    # Batch
    batchFolder: Path
    batchMaskName: str = ""
    # Outputs of the last run (restored with the scene)
    outputTransforms: list[vtkMRMLTransformNode]
    registeredVolumes: list[vtkMRMLScalarVolumeNode]
    outputFused: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputFeatures: vtkMRMLTableNode
    outputPrediction: vtkMRMLTableNode
