"""The project's error types: everything a user can cause raises a subclass of ``MMAError``.

Messages name the input and say what to do about it; the CLI prints them without a
traceback and the Slicer module shows them in a dialog.
"""


class MMAError(Exception):
    """Base class of every error caused by user input or user action."""


class ImageReadError(MMAError):
    """A file or folder could not be read as an image (missing, unreadable, wrong format)."""


class ImageDimensionError(MMAError):
    """An image is not the 3-D scalar volume a step needs (2-D, 4-D, vector/RGB)."""


class NonFiniteImageError(MMAError):
    """An image holds NaN or infinite values."""


class EmptyImageError(MMAError):
    """An image has no voxels, or a mask selects none."""


class ConstantImageError(MMAError):
    """An image (or the region a step looks at) has a single value: no contrast to work with."""


class MissingModalityError(MMAError):
    """A step needs a modality the case does not have."""


class GeometryError(MMAError):
    """Images that must overlap or share a grid do not (e.g. no physical overlap)."""


class LabelError(MMAError):
    """A mask or label image has values the step cannot use."""


class ConfigError(MMAError):
    """A parameter or setting is out of range or unknown."""


class ManifestError(MMAError):
    """A cohort manifest (CSV) is malformed or refers to missing files."""


class OperationCancelled(MMAError):
    """The user cancelled a long-running step."""


class FeatureSetError(MMAError):
    """The features given to a trained classifier do not match the ones it was trained on."""


class ModelError(MMAError):
    """A model file or folder is missing, unreadable, or does not fit the given inputs."""


class UnitsError(ModelError):
    """An image's values do not fit the modality it is given as (e.g. a PET given as the CT),
    so a model (or a classifier's features) would read it on the wrong scale."""


class TrainingError(MMAError):
    """A training run failed on its own terms (e.g. its loss stopped being finite)."""


def for_case(error: MMAError, case_id: str) -> MMAError:
    """The same kind of error, its message starting with the case (once)."""
    message = str(error)
    if message.startswith(f"case {case_id}"):
        return error
    try:
        return type(error)(f"case {case_id}: {message}")
    except TypeError:  # an error class with another signature: keep it as it is
        return error


class MMAWarning(UserWarning):
    """Base of the project's warnings. Each is also logged where it is raised, so the
    ``mma`` command line (whose log goes to stderr) does not print them a second time."""
