"""Classification of cases from radiomics features (scikit-learn) or from multichannel ROI
crops (a MONAI network), with honest validation.

- :func:`evaluate_cv`: repeated stratified nested cross-validation of a training recipe:
  AUC with a bootstrap 95% CI, sensitivity, specificity, balanced accuracy, F1, confusion
  matrix, ROC and confusion-matrix figures.
- :func:`train_classifier`: cross-validate, then fit on every case and save the model
  folder with its metadata; :func:`load_classifier` reads it back and checks the features
  it is given.
- :class:`ClassifierSettings`: the recipe (imputation, scaling, feature selection,
  classifier, class imbalance, calibration) and the CV design.
- ``deep``: the ROI-crop network (``train_deep_classifier``), loaded by the same
  :func:`load_classifier`.
"""

from MultiModalAnalysisLib.classification.estimators import (
    RebalancedClassifier,
    TunedClassifier,
    build_model,
    build_pipeline,
    selected_features,
)
from MultiModalAnalysisLib.classification.evaluation import CVResult, evaluate_cv
from MultiModalAnalysisLib.classification.labels import encode_labels
from MultiModalAnalysisLib.classification.model import (
    TrainedClassifier,
    load_classifier,
    train_classifier,
)
from MultiModalAnalysisLib.classification.selection import CorrelationFilter, MRMRSelector
from MultiModalAnalysisLib.classification.settings import (
    CLASSIFIERS,
    SELECTIONS,
    ClassifierSettings,
    load_settings,
)
from MultiModalAnalysisLib.classification.table import (
    FeatureTable,
    feature_table_from_frame,
    features_from_image_manifest,
    read_feature_table,
)

__all__ = [
    "CLASSIFIERS",
    "SELECTIONS",
    "CVResult",
    "ClassifierSettings",
    "CorrelationFilter",
    "FeatureTable",
    "MRMRSelector",
    "RebalancedClassifier",
    "TrainedClassifier",
    "TunedClassifier",
    "build_model",
    "build_pipeline",
    "encode_labels",
    "evaluate_cv",
    "feature_table_from_frame",
    "features_from_image_manifest",
    "load_classifier",
    "load_settings",
    "read_feature_table",
    "selected_features",
    "train_classifier",
]
