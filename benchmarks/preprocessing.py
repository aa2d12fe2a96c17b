"""Preprocessing timings on real volumes: N4 on a 256^3 MR, CLAHE, the demo's steps.

Run: ``.venv/bin/python benchmarks/preprocessing.py`` (needs ../shared/data or $MMA_DATA).
Prints a Markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time

import SimpleITK as sitk

from MultiModalAnalysisLib.demo import run_demo
from MultiModalAnalysisLib.preprocess import (
    adaptive_histogram_equalisation,
    anisotropic_diffusion,
    n4_bias_correction,
)
from MultiModalAnalysisLib.sample_data import development_data_dir


def timed(function, *args, repeats: int = 3, **kwargs) -> float:
    """Median wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    data = development_data_dir()
    if data is None:
        raise SystemExit("development data not found: set MMA_DATA")
    t1 = sitk.ReadImage(str(data / "brats_gli_00001" / "BraTS-GLI-00001-000-t1n.nii.gz"))
    # A 256^3 MR on a 0.94 x 0.94 x 0.61 mm grid, from the BraTS T1.
    mr256 = sitk.Resample(t1, [256] * 3, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(),
                          [240 / 256, 240 / 256, 155 / 256], t1.GetDirection())
    rows = [
        ("N4 bias-field correction, 256^3 MR (shrink 4)", timed(n4_bias_correction, mr256)),
        ("N4 bias-field correction, BraTS T1 240x240x155", timed(n4_bias_correction, t1)),
        ("CLAHE, 256^3 MR (40 mm kernel)", timed(adaptive_histogram_equalisation, mr256)),
        ("anisotropic diffusion, 5 iterations, 256^3 MR", timed(anisotropic_diffusion, mr256,
                                                               repeats=1)),
    ]
    with tempfile.TemporaryDirectory() as out:
        rows.append(("`mma demo` (STS_002, all steps)", timed(run_demo, out, log=None,
                                                            repeats=1)))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date {datetime.date.today()}")
    print("| step | wall time (s) |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    main()
