"""What a registration returns, and how it is written to disk."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from MultiModalAnalysisLib.errors import MMAError
from MultiModalAnalysisLib.images import value_range
from MultiModalAnalysisLib.io import publish_staged, staged_writes, write_image
from MultiModalAnalysisLib.preprocess import resample_to_reference

log = logging.getLogger(__name__)


@dataclass
class RegistrationResult:
    """A registration's transform, the moving image on the fixed grid, and quality metrics.

    Attributes:
        transform: maps a point of the fixed image's physical space to the moving image's
            (ITK convention); linear for rigid/affine, a composite (affine then a dense
            displacement field or B-spline) for deformable.
        warped: the moving image resampled on the fixed grid through ``transform``
            (a property, computed on first use).
        metrics: runtime_s, metric, metric_before, metric_after (lower is better), and for
            deformable jacobian_min, jacobian_max, folding_percent; tre_mm_* when landmarks
            were given; warnings.
        fixed, moving: the input images (kept for the QC figure; not copies).
        initial_transform: where the registration started (identity when None).
    """

    transform: sitk.Transform
    metrics: dict[str, Any]
    fixed: sitk.Image
    moving: sitk.Image
    initial_transform: sitk.Transform | None = None
    warnings: list[str] = field(default_factory=list)
    _warped: sitk.Image | None = field(default=None, repr=False)

    @property
    def warped(self) -> sitk.Image:
        """The moving image resampled on the fixed grid, anti-aliased where that grid is
        coarser (computed on first use, so a caller that only needs the transform does not
        pay for a full-resolution resampling)."""
        if self._warped is None:
            self._warped = resample_to_reference(self.moving, self.fixed,
                                                 transform=self.transform, antialias=True,
                                                 name="the moving image")
        return self._warped

    @property
    def transform_filename(self) -> str:
        """``transform.tfm`` for a linear transform, ``transform.h5`` otherwise."""
        return "transform.tfm" if self.transform.IsLinear() else "transform.h5"

    def save(self, output_dir: str | Path, *, qc: bool = True) -> dict[str, Path]:
        """Write warped.nii.gz, transform.tfm (linear) or transform.h5, metrics.json and
        qc.png to ``output_dir``; returns the paths by name. A transform of the other kind or
        a QC figure left there by an earlier registration is removed (logged), so the folder
        holds one registration's results.

        The transform file is readable by ``SimpleITK.ReadTransform`` and maps fixed points
        to moving points.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # The files are written into a staging folder and moved into place together: a
        # save stopped half-way (Ctrl-C, an error) leaves the folder as it was, never this
        # run's warped image beside an earlier run's transform and metrics.
        names = {"warped": "warped.nii.gz", "transform": self.transform_filename,
                 "metrics": "metrics.json", **({"qc": "qc.png"} if qc else {})}
        with staged_writes(output_dir, "registration") as staging:
            write_image(self.warped, staging / names["warped"])
            try:
                sitk.WriteTransform(self.transform, str(staging / names["transform"]))
            except RuntimeError as error:
                raise MMAError(f"could not write {output_dir / names['transform']}: "
                               f"{error}") from None
            (staging / names["metrics"]).write_text(
                json.dumps(self.metrics, indent=2, default=_jsonable), encoding="utf-8")
            if qc:
                self.qc_figure(staging / names["qc"])
        # This method owns these names in the folder: an earlier run's transform of the
        # other kind (or its QC figure) would sit beside this run's results and pass for them.
        for stale in sorted({"transform.tfm", "transform.h5", "qc.png"} - set(names.values())):
            if (output_dir / stale).is_file():
                (output_dir / stale).unlink()
                log.info("removed %s, left in %s by an earlier registration", stale, output_dir)
        publish_staged(staging, output_dir)
        return {key: output_dir / name for key, name in names.items()}

    def qc_figure(self, path: str | Path) -> Path:
        """Checkerboard and edge overlay of fixed vs moving, before and after (a PNG)."""
        from MultiModalAnalysisLib.registration.qc import registration_qc_figure

        # Not resample_to_reference: images that start far apart (which the search brings
        # together) need not overlap before; that panel then shows the fill.
        before = sitk.Resample(self.moving, self.fixed,
                               self.initial_transform or sitk.Transform(3, sitk.sitkIdentity),
                               sitk.sitkLinear, value_range(self.moving)[0], sitk.sitkFloat32)
        return registration_qc_figure(
            self.fixed, before, self.warped, path,
            valid_before=self._valid_region(self.initial_transform),
            valid_after=self._valid_region(self.transform),
            title=f"{self.metrics.get('transform_type', '')} registration: before (top of "
            "each pair) and after",
        )


    def _valid_region(self, transform: sitk.Transform | None) -> sitk.Image:
        """Where the moving image shows the patient, on the fixed grid (its field of view,
        minus constant fill), so the QC edges are anatomy rather than the edge of a scan."""
        from MultiModalAnalysisLib.registration.prepare import fill_mask

        valid = fill_mask(self.moving)
        if valid is None:
            valid = sitk.Image(self.moving.GetSize(), sitk.sitkUInt8) + 1
            valid.CopyInformation(self.moving)
        on_fixed = sitk.Resample(sitk.Cast(valid, sitk.sitkFloat32), self.fixed,
                                 transform or sitk.Transform(3, sitk.sitkIdentity),
                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.BinaryErode(sitk.Cast(on_fixed > 0.99, sitk.sitkUInt8), [2, 2, 1])


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
