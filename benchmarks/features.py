"""Radiomics features: IBSI compliance, agreement with pyradiomics, and speed against it.

Run (the speed part under the shared CPU lock):

    MMA_DATA=../shared/data flock /tmp/mma-cpu.lock .venv/bin/python benchmarks/features.py

Needs the ``bench`` extra (pyradiomics 3.0.1: ``pip install numpy`` first, then
``pip install --no-build-isolation pyradiomics==3.0.1``) and the development data. Writes
``benchmarks/results/features/`` (JSON and CSV) and prints Markdown for docs/benchmarks.md.

1. IBSI 1 digital phantom: reference values matched, per family.
2. Agreement with pyradiomics on the 20 STS patients (CT, PET, MR-T1), identical settings:
   no resampling, fixed bin width (25 HU for CT, 0.5 SUV for PET, 25 for MR-T1) with bins
   aligned as pyradiomics aligns them (at a multiple of the width), 3-D texture averaged
   over the 13 directions (IBSI ``3D_avg``; ``3D`` for zone/dependence matrices).
3. Speed on the 20 CT volumes: first order, shape, GLCM, GLRLM, GLSZM, bin width 25 HU,
   per case (read + extract) in one process, alternating the two tools case by case, and
   the whole process (a fresh interpreter over the 20 cases, imports included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from MultiModalAnalysisLib.case import manifest_from_folder
from MultiModalAnalysisLib.features import FeatureSettings, extract_features
from MultiModalAnalysisLib.features.compliance import (
    compare_with_reference,
    compliance_by_family,
    ibsi_phantom_settings,
    read_reference_values,
)
from MultiModalAnalysisLib.io import read_image
from MultiModalAnalysisLib.sample_data import development_data_dir

REPO = Path(__file__).resolve().parents[1]
PHANTOM = REPO / "Testing" / "Data" / "ibsi_digital_phantom"
BIN_WIDTH = {"CT": 25.0, "PET": 0.5, "MR_T1": 25.0}
AGREEMENT = 1e-3

# pyradiomics name (without "original_") -> IBSI tag
PYRADIOMICS_TO_IBSI = {
    "shape_MeshVolume": "morph_volume",
    "shape_VoxelVolume": "morph_vol_approx",
    "shape_SurfaceArea": "morph_area_mesh",
    "shape_SurfaceVolumeRatio": "morph_av",
    "shape_Sphericity": "morph_sphericity",
    "shape_Maximum3DDiameter": "morph_diam",
    "shape_MajorAxisLength": "morph_pca_maj_axis",
    "shape_MinorAxisLength": "morph_pca_min_axis",
    "shape_LeastAxisLength": "morph_pca_least_axis",
    "shape_Elongation": "morph_pca_elongation",
    "shape_Flatness": "morph_pca_flatness",
    "firstorder_Energy": "stat_energy",
    "firstorder_Minimum": "stat_min",
    "firstorder_10Percentile": "stat_p10",
    "firstorder_90Percentile": "stat_p90",
    "firstorder_Maximum": "stat_max",
    "firstorder_Mean": "stat_mean",
    "firstorder_Median": "stat_median",
    "firstorder_InterquartileRange": "stat_iqr",
    "firstorder_Range": "stat_range",
    "firstorder_MeanAbsoluteDeviation": "stat_mad",
    "firstorder_RobustMeanAbsoluteDeviation": "stat_rmad",
    "firstorder_RootMeanSquared": "stat_rms",
    "firstorder_Skewness": "stat_skew",
    "firstorder_Kurtosis": "stat_kurt",
    "firstorder_Variance": "stat_var",
    "firstorder_Entropy": "ih_entropy",
    "firstorder_Uniformity": "ih_uniformity",
    "glcm_Autocorrelation": "cm_auto_corr_3D_avg",
    "glcm_JointAverage": "cm_joint_avg_3D_avg",
    "glcm_ClusterProminence": "cm_clust_prom_3D_avg",
    "glcm_ClusterShade": "cm_clust_shade_3D_avg",
    "glcm_ClusterTendency": "cm_clust_tend_3D_avg",
    "glcm_Contrast": "cm_contrast_3D_avg",
    "glcm_Correlation": "cm_corr_3D_avg",
    "glcm_DifferenceAverage": "cm_diff_avg_3D_avg",
    "glcm_DifferenceEntropy": "cm_diff_entr_3D_avg",
    "glcm_DifferenceVariance": "cm_diff_var_3D_avg",
    "glcm_JointEnergy": "cm_energy_3D_avg",
    "glcm_JointEntropy": "cm_joint_entr_3D_avg",
    "glcm_Imc1": "cm_info_corr1_3D_avg",
    "glcm_Imc2": "cm_info_corr2_3D_avg",
    "glcm_Idm": "cm_inv_diff_mom_3D_avg",
    "glcm_Idmn": "cm_inv_diff_mom_norm_3D_avg",
    "glcm_Id": "cm_inv_diff_3D_avg",
    "glcm_Idn": "cm_inv_diff_norm_3D_avg",
    "glcm_InverseVariance": "cm_inv_var_3D_avg",
    "glcm_MaximumProbability": "cm_joint_max_3D_avg",
    "glcm_SumAverage": "cm_sum_avg_3D_avg",
    "glcm_SumEntropy": "cm_sum_entr_3D_avg",
    "glcm_SumSquares": "cm_joint_var_3D_avg",
    "glrlm_ShortRunEmphasis": "rlm_sre_3D_avg",
    "glrlm_LongRunEmphasis": "rlm_lre_3D_avg",
    "glrlm_GrayLevelNonUniformity": "rlm_glnu_3D_avg",
    "glrlm_GrayLevelNonUniformityNormalized": "rlm_glnu_norm_3D_avg",
    "glrlm_RunLengthNonUniformity": "rlm_rlnu_3D_avg",
    "glrlm_RunLengthNonUniformityNormalized": "rlm_rlnu_norm_3D_avg",
    "glrlm_RunPercentage": "rlm_r_perc_3D_avg",
    "glrlm_GrayLevelVariance": "rlm_gl_var_3D_avg",
    "glrlm_RunVariance": "rlm_rl_var_3D_avg",
    "glrlm_RunEntropy": "rlm_rl_entr_3D_avg",
    "glrlm_LowGrayLevelRunEmphasis": "rlm_lgre_3D_avg",
    "glrlm_HighGrayLevelRunEmphasis": "rlm_hgre_3D_avg",
    "glrlm_ShortRunLowGrayLevelEmphasis": "rlm_srlge_3D_avg",
    "glrlm_ShortRunHighGrayLevelEmphasis": "rlm_srhge_3D_avg",
    "glrlm_LongRunLowGrayLevelEmphasis": "rlm_lrlge_3D_avg",
    "glrlm_LongRunHighGrayLevelEmphasis": "rlm_lrhge_3D_avg",
    "glszm_SmallAreaEmphasis": "szm_sze_3D",
    "glszm_LargeAreaEmphasis": "szm_lze_3D",
    "glszm_GrayLevelNonUniformity": "szm_glnu_3D",
    "glszm_GrayLevelNonUniformityNormalized": "szm_glnu_norm_3D",
    "glszm_SizeZoneNonUniformity": "szm_zsnu_3D",
    "glszm_SizeZoneNonUniformityNormalized": "szm_zsnu_norm_3D",
    "glszm_ZonePercentage": "szm_z_perc_3D",
    "glszm_GrayLevelVariance": "szm_gl_var_3D",
    "glszm_ZoneVariance": "szm_zs_var_3D",
    "glszm_ZoneEntropy": "szm_zs_entr_3D",
    "glszm_LowGrayLevelZoneEmphasis": "szm_lgze_3D",
    "glszm_HighGrayLevelZoneEmphasis": "szm_hgze_3D",
    "glszm_SmallAreaLowGrayLevelEmphasis": "szm_szlge_3D",
    "glszm_SmallAreaHighGrayLevelEmphasis": "szm_szhge_3D",
    "glszm_LargeAreaLowGrayLevelEmphasis": "szm_lzlge_3D",
    "glszm_LargeAreaHighGrayLevelEmphasis": "szm_lzhge_3D",
    "gldm_SmallDependenceEmphasis": "ngl_lde_3D",
    "gldm_LargeDependenceEmphasis": "ngl_hde_3D",
    "gldm_LowGrayLevelEmphasis": "ngl_lgce_3D",
    "gldm_HighGrayLevelEmphasis": "ngl_hgce_3D",
    "gldm_SmallDependenceLowGrayLevelEmphasis": "ngl_ldlge_3D",
    "gldm_SmallDependenceHighGrayLevelEmphasis": "ngl_ldhge_3D",
    "gldm_LargeDependenceLowGrayLevelEmphasis": "ngl_hdlge_3D",
    "gldm_LargeDependenceHighGrayLevelEmphasis": "ngl_hdhge_3D",
    "gldm_GrayLevelNonUniformity": "ngl_glnu_3D",
    "gldm_DependenceNonUniformity": "ngl_dcnu_3D",
    "gldm_DependenceNonUniformityNormalized": "ngl_dcnu_norm_3D",
    "gldm_GrayLevelVariance": "ngl_gl_var_3D",
    "gldm_DependenceVariance": "ngl_dc_var_3D",
    "gldm_DependenceEntropy": "ngl_dc_entr_3D",
    "ngtdm_Coarseness": "ngt_coarseness_3D",
    "ngtdm_Contrast": "ngt_contrast_3D",
    "ngtdm_Busyness": "ngt_busyness_3D",
    "ngtdm_Complexity": "ngt_complexity_3D",
    "ngtdm_Strength": "ngt_strength_3D",
}
# Where the two definitions differ on purpose: how pyradiomics' value relates to IBSI's.
DEFINITION_DIFFERENCES = {
    "firstorder_Kurtosis": (
        lambda value: value - 3.0,
        "pyradiomics reports kurtosis, IBSI excess kurtosis (kurtosis - 3); compared after "
        "subtracting 3",
    ),
}
PYRADIOMICS_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
SPEED_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm")
# Our side of the speed comparison: the same families (IBSI morphology, statistics and
# histogram, GLCM, GLRLM, GLSZM) at 3-D, without what pyradiomics has no counterpart for
# and costs extra (Moran's I / Geary's C and the non-standard OMBB / MVEE densities).
SPEED_SETTINGS = {
    "families": ["morph", "stat", "ih", "cm", "rlm", "szm"],
    "features": ["morph_[!mg]*", "stat_*", "ih_*", "cm_*", "rlm_*", "szm_*"],
    "texture_aggregation": ["3D"],
    "non_standard_features": False,
    "discretisation_method": "fixed_bin_size",
    "discretisation_bin_width": 25.0,
}


def compliance() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The phantom's reference values matched, per family."""
    image = sitk.ReadImage(str(PHANTOM / "phantom.nii.gz"))
    mask = sitk.ReadImage(str(PHANTOM / "mask.nii.gz"))
    values = extract_features({"phantom": image}, mask, ibsi_phantom_settings(), device="cpu")
    table = compare_with_reference(
        values, read_reference_values(PHANTOM / "reference_values.csv"), prefix="phantom_"
    )
    return table, compliance_by_family(table)


def pyradiomics_extractor(bin_width: float, classes=PYRADIOMICS_CLASSES):
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(binWidth=bin_width)
    extractor.disableAllFeatures()
    for name in classes:
        extractor.enableFeatureClassByName(name)
    return extractor


def aligned_settings(image: sitk.Image, mask: sitk.Image, bin_width: float) -> FeatureSettings:
    """IBSI fixed bin size with pyradiomics' bin edges (multiples of the width)."""
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) > 0]
    return FeatureSettings(
        families=("morph", "stat", "ih", "cm", "rlm", "szm", "ngl", "ngt"),
        texture_aggregation=("3D",),
        non_standard_features=False,
        discretisation_method="fixed_bin_size",
        discretisation_bin_width=bin_width,
        discretisation_lower_bound=math.floor(float(values.min()) / bin_width) * bin_width,
    )


def agreement(cohort: Path, cases: list[str]) -> pd.DataFrame:
    """Per case, modality and mapped feature: both values and their relative difference."""
    rows = []
    for case in cases:
        for modality, width in BIN_WIDTH.items():
            image = sitk.ReadImage(str(cohort / case / f"{modality}_image.nii.gz"))
            mask = sitk.ReadImage(str(cohort / case / f"{modality}_mask.nii.gz"))
            theirs = pyradiomics_extractor(width).execute(image, mask)
            ours = extract_features(
                {modality: image}, mask, aligned_settings(image, mask, width), device="cpu"
            )
            for name, tag in PYRADIOMICS_TO_IBSI.items():
                value = float(theirs[f"original_{name}"])
                if name in DEFINITION_DIFFERENCES:
                    value = DEFINITION_DIFFERENCES[name][0](value)
                mine = ours[f"{modality}_{tag}"]
                scale = max(abs(value), abs(mine), 1e-12)
                rows.append(
                    {
                        "case": case,
                        "modality": modality,
                        "pyradiomics": name,
                        "ibsi": tag,
                        "theirs": value,
                        "ours": mine,
                        "relative": abs(value - mine) / scale,
                    }
                )
        print(f"  agreement: {case} done", flush=True)
    return pd.DataFrame(rows)


def speed(cohort: Path, cases: list[str], workdir: Path, repeats: int = 3) -> dict:
    """Per-case wall times in one process, and whole-process times over all cases.

    The whole process runs ``repeats`` times for each tool, alternating; the median is
    reported (single runs moved by +-10 % on this shared machine).
    """
    settings = FeatureSettings.from_dict(SPEED_SETTINGS)
    extractor = pyradiomics_extractor(25.0, SPEED_CLASSES)

    def ours(case: str) -> None:
        image = read_image(cohort / case / "CT_image.nii.gz")
        mask = read_image(cohort / case / "CT_mask.nii.gz")
        extract_features({"CT": image}, mask, settings, device="cpu")

    def theirs(case: str) -> None:
        extractor.execute(
            str(cohort / case / "CT_image.nii.gz"), str(cohort / case / "CT_mask.nii.gz")
        )

    ours(cases[0]), theirs(cases[0])  # warm-up: first-call costs belong to neither case
    per_case = {"ours": [], "pyradiomics": []}
    for case in cases:
        for name, run in (("ours", ours), ("pyradiomics", theirs)):
            start = time.perf_counter()
            run(case)
            per_case[name].append(time.perf_counter() - start)

    manifest = workdir / "cases.csv"
    manifest_from_folder(cohort, relative_to=workdir).query("case_id in @cases").to_csv(
        manifest, index=False
    )
    settings_file = settings.save(workdir / "speed_settings.json")
    our_command = [
        sys.executable,
        "-m",
        "MultiModalAnalysisLib",
        "-q",
        "features",
        "--manifest",
        str(manifest),
        "--mask-column",
        "CT_mask",
        "--modalities",
        "CT",
        "--settings",
        str(settings_file),
        "--device",
        "cpu",
        "--output",
        str(workdir / "ours.csv"),
    ]
    their_command = [sys.executable, "-c", PYRADIOMICS_BATCH, str(manifest), str(workdir)]
    runs: dict[str, list[float]] = {"ours": [], "pyradiomics": []}
    for _ in range(repeats):
        for name, command in (("ours", our_command), ("pyradiomics", their_command)):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, text=True)
            runs[name].append(time.perf_counter() - start)
    whole = {name: statistics.median(times) for name, times in runs.items()}
    return {
        "per_case": per_case,
        "whole_process": whole,
        "whole_process_runs": runs,
        "cases": len(cases),
    }


PYRADIOMICS_BATCH = """
import logging, sys
from pathlib import Path
import pandas as pd
from radiomics import featureextractor
logging.getLogger("radiomics").setLevel(logging.ERROR)
manifest, out = Path(sys.argv[1]), Path(sys.argv[2])
extractor = featureextractor.RadiomicsFeatureExtractor(binWidth=25)
extractor.disableAllFeatures()
for name in ("shape", "firstorder", "glcm", "glrlm", "glszm"):
    extractor.enableFeatureClassByName(name)
rows = []
for row in pd.read_csv(manifest).itertuples():
    result = extractor.execute(str(manifest.parent / row.CT), str(manifest.parent / row.CT_mask))
    rows.append({"case_id": row.case_id, **{k: v for k, v in result.items()
                                            if not k.startswith("diagnostics")}})
pd.DataFrame(rows).to_csv(out / "pyradiomics.csv", index=False)
"""


def markdown(summary: pd.DataFrame, table: pd.DataFrame, agree: pd.DataFrame, timing: dict):
    lines = [
        f"Phantom: {int(table['matched'].sum())} of {len(table)} reference values matched.",
        "",
        "| family | matched / reference values |",
        "|---|---|",
    ]
    lines += [
        f"| {family} | {row.matched} / {row.reference_values} |"
        for family, row in summary.iterrows()
    ]
    worst = agree.groupby(["pyradiomics", "ibsi"])["relative"].agg(["max", "median"])
    agreeing = worst[worst["max"] <= AGREEMENT]
    lines += [
        "",
        f"pyradiomics agreement: {len(agreeing)} of {len(worst)} mapped features "
        f"within {AGREEMENT:g} relative difference on every case and modality "
        f"({agree['case'].nunique()} patients x {agree['modality'].nunique()} modalities).",
        "",
        "| pyradiomics | IBSI tag | max rel. diff | median rel. diff |",
        "|---|---|---|---|",
    ]
    for (name, tag), row in worst.sort_values("max", ascending=False).iterrows():
        lines.append(f"| {name} | {tag} | {row['max']:.1e} | {row['median']:.1e} |")
    ours, theirs = (np.array(timing["per_case"][k]) for k in ("ours", "pyradiomics"))
    lines += [
        "",
        "| speed, CT, bin width 25 HU | ours | pyradiomics | ratio |",
        "|---|---|---|---|",
        f"| per case, median (s) | {np.median(ours):.3f} | {np.median(theirs):.3f} | "
        f"{np.median(theirs) / np.median(ours):.1f}x |",
        f"| per case, total over {timing['cases']} (s) | {ours.sum():.2f} | "
        f"{theirs.sum():.2f} | {theirs.sum() / ours.sum():.1f}x |",
    ]
    whole = timing["whole_process"]
    runs = timing.get("whole_process_runs", {})
    lines.append(
        f"| whole process over {timing['cases']} cases (s), median of "
        f"{len(runs.get('ours', [1]))} | {whole['ours']:.2f} | "
        f"{whole['pyradiomics']:.2f} | {whole['pyradiomics'] / whole['ours']:.1f}x |"
    )
    if runs:
        lines.append(
            "\nWhole-process runs (s): ours "
            + ", ".join(f"{t:.2f}" for t in runs["ours"])
            + "; pyradiomics "
            + ", ".join(f"{t:.2f}" for t in runs["pyradiomics"])
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20, help="number of STS patients")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="whole-process runs per tool (median)"
    )
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/features")
    args = parser.parse_args()
    data = development_data_dir()
    if data is None:
        raise SystemExit("development data not found: set MMA_DATA (e.g. ../shared/data)")
    cohort = data / "sts"
    cases = sorted(p.name for p in cohort.iterdir() if p.is_dir())[: args.cases]
    args.output.mkdir(parents=True, exist_ok=True)

    table, summary = compliance()
    table.to_csv(args.output / "ibsi_phantom.csv", index=False)
    print(f"IBSI phantom: {int(table['matched'].sum())} / {len(table)} matched", flush=True)
    agreement_file = args.output / "pyradiomics_agreement.csv"
    if args.skip_agreement and agreement_file.is_file():
        agree = pd.read_csv(agreement_file)
    else:
        agree = agreement(cohort, cases)
        agree.to_csv(agreement_file, index=False)
    timing = {
        "per_case": {"ours": [math.nan], "pyradiomics": [math.nan]},
        "whole_process": {"ours": math.nan, "pyradiomics": math.nan},
        "cases": 0,
    }
    if not args.skip_speed:
        with tempfile.TemporaryDirectory() as workdir:
            timing = speed(cohort, cases, Path(workdir), args.repeats)
    (args.output / "speed.json").write_text(json.dumps(timing, indent=2))
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; date {datetime.date.today()}; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; median per-case times "
        f"{statistics.median(timing['per_case']['ours']):.3f} s (ours)\n"
    )
    print(markdown(summary, table, agree, timing))


if __name__ == "__main__":
    main()
