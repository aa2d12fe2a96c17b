"""Feature-extraction settings: the IBSI-1 image-processing chain and feature parameters.

The names follow the IBSI reference manual (chapter 2, "image processing", and the
parameters of each feature family), in snake case. A settings file (JSON or YAML) holds any
subset of these keys; what it leaves out keeps its default. The defaults:

=================================  ==================  =========================================
key                                default             meaning
=================================  ==================  =========================================
``new_spacing``                    ``null``            resample to this voxel spacing (x, y, z mm;
                                                       one number: isotropic); null keeps the grid
``interpolation_method``           ``"linear"``        image interpolator: nearest, linear, bspline
``roi_interpolation_method``       ``"linear"``        mask interpolator (then thresholded)
``roi_partial_volume_threshold``   ``0.5``             interpolated mask value that stays inside
``intensity_rounding``             ``false``           round intensities after interpolation (CT)
``resegmentation_range``           ``null``            [low, high] intensities kept in the
                                                       intensity mask (null end: open)
``resegmentation_outlier_sigma``   ``null``            drop voxels beyond mean +- sigma * sd
``discretisation_method``          ``"fixed_bin_number"``  texture grey levels: fixed_bin_number,
                                                       fixed_bin_size or none (use as-is)
``discretisation_bin_number``      ``32``              bins for fixed_bin_number
``discretisation_bin_width``       ``25.0``            bin width for fixed_bin_size
``discretisation_lower_bound``     ``null``            fixed_bin_size's first bin edge (default:
                                                       re-segmentation low end, else ROI minimum)
``ih_discretisation_*``            ``null``            the intensity histogram's own method,
                                                       bin number, width, lower bound (null: as
                                                       for texture)
``ivh_discretisation_method``      ``"none"``          intensity-volume histogram: none (whole-
                                                       number intensities as they are, e.g.
                                                       CT HU; others get fixed_bin_number),
                                                       fixed_bin_number or fixed_bin_size
``ivh_discretisation_bin_number``  ``1000``            bins for the IVH (fixed_bin_number)
``ivh_discretisation_bin_width``   ``null``            bin width for the IVH (fixed_bin_size)
``texture_aggregation``            ``["2D", "2.5D", "3D"]``  IBSI aggregation levels computed
``glcm_distance``                  ``1``               GLCM neighbour distance (Chebyshev)
``ngtdm_distance``                 ``1``               NGTDM neighbourhood distance
``ngldm_distance``                 ``1``               NGLDM neighbourhood distance
``ngldm_coarseness``               ``0``               NGLDM coarseness alpha
``families``                       all                 morph, loc, stat, ih, ivh, cm, rlm, szm,
                                                       dzm, ngt, ngl
``features``                       ``null``            only these IBSI tags (glob patterns
                                                       allowed, e.g. ``cm_*_3D_avg``); null: all
``non_standard_features``          ``true``            also OMBB/MVEE densities and IVH AUC,
                                                       which IBSI lists but does not standardise
``mask_grid_mismatch``             ``"resample"``      mask on another grid: resample it onto
                                                       the image (with a warning) or ``error``
``per_image``                      ``{}``              settings of one image, by its name or
                                                       modality (below)
=================================  ==================  =========================================

Settings are in the units of the images they measure, so one set rarely fits a CT in HU and
a PET in SUV alike. ``per_image`` maps an image's name (a modality such as ``CT``, ``PET``,
``MR_T1``, spelled in any way the modality names accept, or another image name such as
``FUSED``) to the settings that differ for it; the others apply to every image::

    texture_aggregation: [3D]
    per_image:
      CT: {discretisation_method: fixed_bin_size, discretisation_bin_width: 25}
      PET: {discretisation_method: fixed_bin_size, discretisation_bin_width: 0.5}

A fixed_bin_size discretisation (and an IVH with ``none`` on non-integer intensities) uses
the re-segmentation range when one is given, as IBSI recommends for CT and PET.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.settings_file import read_settings_file, yaml_module
from MultiModalAnalysisLib.values import flag
from MultiModalAnalysisLib.values import number as _number
from MultiModalAnalysisLib.values import whole as _whole

FAMILIES = ("morph", "loc", "stat", "ih", "ivh", "cm", "rlm", "szm", "dzm", "ngt", "ngl")
TEXTURE_FAMILIES = ("cm", "rlm", "szm", "dzm", "ngt", "ngl")
AGGREGATIONS = ("2D", "2.5D", "3D")
DISCRETISATION_METHODS = ("fixed_bin_number", "fixed_bin_size", "none")
# Most grey levels a texture family takes: its matrices grow with their square (GLCM: 8 MB
# per direction at 1024 levels), and more levels than this means a bin width far finer than
# the image's noise (0.1 on a CT in HU, or SUV-sized bins on a PET in Bq/ml).
MAX_GREY_LEVELS = 1024
INTERPOLATION_METHODS = ("nearest", "linear", "bspline")
GRID_MISMATCH_POLICIES = ("resample", "error")


@dataclass(frozen=True)
class Discretisation:
    """One discretisation: method, bin number or width, and the first bin's lower edge."""

    method: str = "fixed_bin_number"
    bin_number: int = 32
    bin_width: float = 25.0
    lower_bound: float | None = None


@dataclass
class FeatureSettings:
    """Every parameter of feature extraction; see the module docstring for each key."""

    new_spacing: tuple[float, float, float] | None = None
    interpolation_method: str = "linear"
    roi_interpolation_method: str = "linear"
    roi_partial_volume_threshold: float = 0.5
    intensity_rounding: bool = False
    resegmentation_range: tuple[float | None, float | None] | None = None
    resegmentation_outlier_sigma: float | None = None
    discretisation_method: str = "fixed_bin_number"
    discretisation_bin_number: int = 32
    discretisation_bin_width: float = 25.0
    discretisation_lower_bound: float | None = None
    ih_discretisation_method: str | None = None
    ih_discretisation_bin_number: int | None = None
    ih_discretisation_bin_width: float | None = None
    ih_discretisation_lower_bound: float | None = None
    ivh_discretisation_method: str = "none"
    ivh_discretisation_bin_number: int = 1000
    ivh_discretisation_bin_width: float | None = None
    texture_aggregation: tuple[str, ...] = AGGREGATIONS
    glcm_distance: int = 1
    ngtdm_distance: int = 1
    ngldm_distance: int = 1
    ngldm_coarseness: float = 0.0
    families: tuple[str, ...] = FAMILIES
    features: tuple[str, ...] | None = None
    non_standard_features: bool = True
    mask_grid_mismatch: str = "resample"
    per_image: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # One name where a sequence is expected ("3D", "stat") means that one item, as in a
        # settings file; never its characters.
        for key in ("texture_aggregation", "families", "features"):
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, key, tuple(value))
        self.validate()

    def for_image(self, name: str) -> FeatureSettings:
        """The settings of the image named ``name``: these, with its ``per_image`` ones."""
        changes = self.per_image.get(_image_key(name))
        if not changes:
            return self
        return replace(self, per_image={}, **changes)

    # -- derived views -------------------------------------------------------------------
    @property
    def texture(self) -> Discretisation:
        """The discretisation of the texture families."""
        return Discretisation(
            self.discretisation_method,
            int(self.discretisation_bin_number),
            float(self.discretisation_bin_width),
            self._lower_bound(self.discretisation_lower_bound),
        )

    @property
    def intensity_histogram(self) -> Discretisation:
        """The intensity histogram's discretisation (the texture one unless overridden)."""
        texture = self.texture
        return Discretisation(
            self.ih_discretisation_method or texture.method,
            int(self.ih_discretisation_bin_number or texture.bin_number),
            float(self.ih_discretisation_bin_width or texture.bin_width),
            self._lower_bound(self.ih_discretisation_lower_bound)
            if self.ih_discretisation_lower_bound is not None
            else texture.lower_bound,
        )

    @property
    def intensity_volume_histogram(self) -> Discretisation:
        """The IVH's discretisation."""
        return Discretisation(
            self.ivh_discretisation_method,
            int(self.ivh_discretisation_bin_number),
            float(self.ivh_discretisation_bin_width or 0.0),
            self._lower_bound(None),
        )

    def _lower_bound(self, explicit: float | None) -> float | None:
        if explicit is not None:
            return float(explicit)
        if self.resegmentation_range is not None and self.resegmentation_range[0] is not None:
            return float(self.resegmentation_range[0])
        return None

    def wants(self, family: str) -> bool:
        """True when ``family`` (e.g. ``"cm"``) is to be computed."""
        if family not in self.families:
            return False
        if self.features is None:
            return True
        return any(p.startswith(family + "_") or p[:1] in "*?[" for p in self.features)

    def wants_feature(self, tag: str) -> bool:
        """True when the feature ``tag`` (e.g. ``"morph_moran_i"``) is to be reported."""
        if not self.wants(tag.split("_", 1)[0]):
            return False
        return self.features is None or _pattern(self.features).match(tag) is not None

    def unmatched_features(self, tags) -> list[str]:
        """The entries of ``features`` that match none of ``tags`` (bare IBSI tags), with the
        glob matching :meth:`wants_feature` uses."""
        if self.features is None:
            return []
        return [p for p in self.features if not any(_pattern((p,)).match(t) for t in tags)]

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Normalise types and raise :class:`ConfigError` on an out-of-range value."""
        if self.extra:
            raise ConfigError(
                f"unknown feature setting(s): {', '.join(sorted(self.extra))}. Known: "
                f"{', '.join(SETTING_NAMES)}."
            )
        self._check_per_image()
        if self.new_spacing is not None:
            spacing = self.new_spacing
            if isinstance(spacing, (int, float)):
                spacing = (spacing,) * 3
            try:
                spacing = tuple(float(s) for s in spacing)
            except (TypeError, ValueError):
                spacing = ()
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ConfigError(
                    f"new_spacing must be one positive number or three (x, y, z mm), not "
                    f"{self.new_spacing!r}."
                )
            self.new_spacing = spacing
        _choose("interpolation_method", self.interpolation_method, INTERPOLATION_METHODS)
        _choose("roi_interpolation_method", self.roi_interpolation_method, INTERPOLATION_METHODS)
        if not 0.0 < float(self.roi_partial_volume_threshold) <= 1.0:
            raise ConfigError("roi_partial_volume_threshold must lie in (0, 1].")
        if self.resegmentation_range is not None:
            low, high = _pair(self.resegmentation_range, "resegmentation_range")
            if any(v is not None and math.isnan(v) for v in (low, high)):
                raise ConfigError("resegmentation_range holds NaN: give numbers, or null for "
                                  "an open end.")
            if low is not None and high is not None and low > high:
                raise ConfigError(f"resegmentation_range [{low}, {high}] is empty (low > high).")
            self.resegmentation_range = (low, high)
        if self.resegmentation_outlier_sigma is not None:
            _positive("resegmentation_outlier_sigma", self.resegmentation_outlier_sigma,
                      "e.g. 3")
        for prefix in ("", "ih_", "ivh_"):
            method = getattr(self, f"{prefix}discretisation_method")
            if method is not None:
                _choose(f"{prefix}discretisation_method", method, DISCRETISATION_METHODS)
            number = getattr(self, f"{prefix}discretisation_bin_number")
            if number is not None:
                # (the IVH is a histogram, not a texture matrix: it may have many more bins)
                most = MAX_GREY_LEVELS if prefix != "ivh_" else 100 * MAX_GREY_LEVELS
                setattr(self, f"{prefix}discretisation_bin_number",
                        _whole(f"{prefix}discretisation_bin_number", number, 1, most))
            width = getattr(self, f"{prefix}discretisation_bin_width")
            if width is not None:
                _positive(f"{prefix}discretisation_bin_width", width, "e.g. 25 HU for CT")
            bound = getattr(self, f"{prefix}discretisation_lower_bound", None)
            if bound is not None and not math.isfinite(_number(
                    f"{prefix}discretisation_lower_bound", bound)):
                raise ConfigError(f"{prefix}discretisation_lower_bound must be a finite "
                                  "number (or null).")
        if (
            self.ivh_discretisation_method == "fixed_bin_size"
            and not self.ivh_discretisation_bin_width
        ):
            raise ConfigError(
                "ivh_discretisation_method fixed_bin_size needs ivh_discretisation_bin_width "
                "(e.g. 1 HU for CT, 0.1 SUV for PET)."
            )
        self.texture_aggregation = tuple(str(a).upper() for a in self.texture_aggregation)
        for level in self.texture_aggregation:
            _choose("texture_aggregation", level, AGGREGATIONS)
        if self.features is not None:
            if isinstance(self.features, str):
                self.features = (self.features,)
            self.features = tuple(str(f) for f in self.features)
        self.families = tuple(str(f).lower() for f in self.families)
        for family in self.families:
            _choose("families", family, FAMILIES)
        for name, what in (("families", "the feature families"),
                           ("texture_aggregation", "the aggregation levels")):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: give at least one of {what} (or leave "
                                  "the setting out for all of them).")
        # a switch written as text ("false", "no") would read as true
        self.intensity_rounding = flag("intensity_rounding", self.intensity_rounding)
        self.non_standard_features = flag("non_standard_features", self.non_standard_features)
        for name in ("glcm_distance", "ngtdm_distance", "ngldm_distance"):
            setattr(self, name, _whole(name, getattr(self, name), 1, 100))
        coarseness = _number("ngldm_coarseness", self.ngldm_coarseness)
        if not math.isfinite(coarseness) or coarseness < 0:
            raise ConfigError("ngldm_coarseness must be a finite number, not negative.")
        _choose("mask_grid_mismatch", self.mask_grid_mismatch, GRID_MISMATCH_POLICIES)

    def _check_per_image(self) -> None:
        """``per_image``: image name -> settings, keyed by the name's canonical spelling;
        each image's settings are validated as a whole."""
        given = self.per_image or {}
        if not isinstance(given, dict):
            raise ConfigError("per_image must map image names (CT, PET, ...) to their "
                              "settings.")
        per_image: dict[str, dict[str, Any]] = {}
        for name, changes in given.items():
            key = _image_key(name)
            if key in per_image:
                raise ConfigError(f"per_image names {key} twice ({name!r} is the same image).")
            if not isinstance(changes, dict):
                raise ConfigError(f"per_image {name}: give a mapping of settings, e.g. "
                                  "{discretisation_bin_width: 0.5}.")
            unknown = sorted(k for k in changes if k not in SETTING_NAMES or k == "per_image")
            if unknown:
                raise ConfigError(
                    f"per_image {name}: unknown feature setting(s) {', '.join(unknown)}. "
                    f"Known: {', '.join(n for n in SETTING_NAMES if n != 'per_image')}.")
            try:
                replace(self, per_image={}, **changes)
            except ConfigError as error:
                raise ConfigError(f"per_image {name}: {error}") from None
            except (TypeError, ValueError) as error:
                raise ConfigError(f"per_image {name}: a setting has the wrong type "
                                  f"({error}).") from None
            per_image[key] = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in changes.items()}
        self.per_image = per_image

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-ready values (tuples become lists)."""
        values = asdict(self)
        values.pop("extra")
        if not values["per_image"]:
            values.pop("per_image")  # (as settings written before per_image existed)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def save(self, path: str | Path) -> Path:
        """Write the settings as JSON, or YAML when the suffix is .yaml/.yml."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".yaml", ".yml"):
            yaml = yaml_module(path)
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def updated(self, **changes: Any) -> FeatureSettings:
        """A copy with some settings changed (validated)."""
        return replace(self, **changes)

    def unused(self, keys: Any) -> list[str]:
        """Of the setting names ``keys``, those these settings do not use (a bin width with
        a fixed bin number, ...): a setting given but ignored is a mistake a user should
        hear of."""
        sized = {self.texture.method, self.intensity_histogram.method}
        uses = {
            "discretisation_bin_width": "fixed_bin_size" in sized,
            "discretisation_lower_bound": "fixed_bin_size" in sized,
            "discretisation_bin_number": "fixed_bin_number" in sized,
            "ih_discretisation_bin_width":
                self.intensity_histogram.method == "fixed_bin_size",
            "ih_discretisation_lower_bound":
                self.intensity_histogram.method == "fixed_bin_size",
            "ih_discretisation_bin_number":
                self.intensity_histogram.method == "fixed_bin_number",
            "ivh_discretisation_bin_width":
                self.ivh_discretisation_method == "fixed_bin_size",
            "ivh_discretisation_bin_number":
                self.ivh_discretisation_method == "fixed_bin_number",
        }
        return [k for k in keys if not uses.get(k, True)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> FeatureSettings:
        """Settings from a mapping of IBSI parameter names; unknown names are an error, and
        a setting the others make unused (a bin width with a fixed bin number) is warned
        about, per image too."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source} must hold a mapping of setting names to values.")
        known = {k: v for k, v in values.items() if k in SETTING_NAMES}
        unknown = {k: v for k, v in values.items() if k not in SETTING_NAMES}
        try:
            settings = cls(**known, extra=unknown)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{source}: a setting has the wrong type ({error}).") from None
        # (a saved file holds every key, the defaults too: those are no choice)
        defaults = FeatureSettings().to_dict()
        chosen = [k for k, v in known.items() if k not in defaults or v != defaults[k]]
        _warn_unused(source, "", tuple(settings.unused(chosen)))
        for name, changes in settings.per_image.items():
            _warn_unused(source, f"per_image {name}: ",
                         tuple(settings.for_image(name).unused(changes)))
        return settings


SETTING_NAMES = tuple(f.name for f in fields(FeatureSettings) if f.name != "extra")


def load_settings(source: FeatureSettings | dict | str | Path | None = None) -> FeatureSettings:
    """Feature settings from a :class:`FeatureSettings`, a dict, a JSON/YAML file, or defaults.

    Raises:
        ConfigError: unreadable file, unknown key or out-of-range value.
    """
    if source is None:
        return FeatureSettings()
    if isinstance(source, FeatureSettings):
        return source
    if isinstance(source, dict):
        return FeatureSettings.from_dict(source)
    path = Path(source)
    values = read_settings_file(path, "feature settings")
    return FeatureSettings.from_dict(values, source=f"settings file {path}")


@lru_cache(maxsize=64)
def _warn_unused(source: str, where: str, keys: tuple[str, ...] | list[str]) -> None:
    """Warn (once per settings and keys: a cohort reads its settings file per case) about
    settings that the chosen discretisation methods leave unused."""
    if keys:
        import logging

        logging.getLogger(__name__).warning(
            "%s: %s%s not used: the discretisation method in force takes no such setting "
            "(a bin width goes with fixed_bin_size, a bin number with fixed_bin_number): "
            "set discretisation_method (or ih_/ivh_discretisation_method) to the method "
            "meant.", source, where, ", ".join(keys))


def _image_key(name: str) -> str:
    """An image's name as ``per_image`` keys it: the canonical modality spelling (``t1`` ->
    ``MR_T1``), which upper-cases other names (``fused`` -> ``FUSED``)."""
    from MultiModalAnalysisLib.modalities import canonical_modality

    return canonical_modality(name)


@lru_cache(maxsize=32)
def _pattern(patterns: tuple[str, ...]) -> re.Pattern:
    """One compiled regular expression for a tuple of glob patterns."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _choose(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(choices)}.")


def _positive(name: str, value: Any, example: str) -> float:
    number = _number(name, value)
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{name} must be a positive, finite number ({example}), not "
                          f"{value!r}.")
    return number


def _pair(value: Any, name: str) -> tuple[float | None, float | None]:
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be [low, high] (null for an open end).") from None
    return (None if low is None else float(low)), (None if high is None else float(high))
