"""The whole pipeline over the development cohort: ``mma batch`` on the 20 STS patients.

Run (under the shared CPU lock, nothing else running):

    flock /tmp/mma-cpu.lock .venv/bin/python benchmarks/batch.py --data ../shared/data/sts

For every patient: CT as the reference, PET and MR-T1 registered to it rigidly, the
expert's ``CT_mask`` measured on every modality with the shipped classifier's feature
settings (per-modality discretisation, 3-D texture) and the shipped lung-metastasis
classifier's prediction. The command runs in a fresh interpreter (imports included), as a
user runs it, with ``--save-dir`` off. Reported from the batch's own record
(``rows.batch.json``): the whole run's wall time, the time per case (median and range), the
registrations' own time, and the peak memory (the child's maximum resident set). Writes
``benchmarks/results/batch/summary.json`` and prints Markdown for docs/benchmarks.md.

Then ``--resume`` on the finished table (the cost of doing nothing again) and on the table
with 5 rows removed, to time the resumption.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "batch"
CLASSIFIER = REPO / "Resources" / "Models" / "sts_lungmets_classifier"


def mma(*arguments: str) -> tuple[float, int, str]:
    """Run ``mma`` in a fresh interpreter: (wall seconds, exit status, stderr's tail)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "MultiModalAnalysisLib", "-q", *arguments],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start, done.returncode, done.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the STS cohort folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mma-batch-bench"))
    parser.add_argument("--cases", type=int, help="only the first N cases (a quick check)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = args.work / "cases.csv"
    rows = args.work / "rows.csv"
    for stale in (rows, rows.with_name("rows.batch.json")):
        stale.unlink(missing_ok=True)
    seconds, status, _ = mma("manifest", str(args.data), "--outcomes",
                             str(args.data / "outcomes.csv"), "--output", str(manifest))
    assert status == 0, "mma manifest failed"
    if args.cases:
        pd.read_csv(manifest).head(args.cases).to_csv(manifest, index=False)
    command = ["batch", "--manifest", str(manifest), "--modalities", "CT,PET,MR_T1",
               "--mask-column", "CT_mask", "--registration", "rigid", "--settings",
               str(CLASSIFIER / "feature_settings.json"), "--classifier", str(CLASSIFIER),
               "--device", "cpu", "--output", str(rows)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    wall, status, tail = mma(*command)
    peak_mb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    if status != 0:
        print(tail, file=sys.stderr)
    record = json.loads(rows.with_name("rows.batch.json").read_text())
    cases = record["cases"]
    per_case = [c["seconds"] for c in cases.values() if c["status"] == "measured"]
    registration = {m: [c["registration"][m]["runtime_s"] for c in cases.values()
                        if m in c.get("registration", {})] for m in ("PET", "MR_T1")}
    measured = [c for c in cases.values() if c["status"] == "measured"]
    stages = {stage: {"median": round(statistics.median(c["stages"][stage] for c in measured),
                                      2),
                      "sum": round(sum(c["stages"][stage] for c in measured), 1)}
              for stage in measured[0]["stages"]}
    largest = max(measured, key=lambda c: c["region"]["voxels"])
    table = pd.read_csv(rows)
    resumed_all, status_all, _ = mma(*command, "--resume")
    table.drop(index=table.index[-5:]).to_csv(rows, index=False)
    resumed_five, status_five, _ = mma(*command, "--resume")
    summary = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "exit_status": status, "cases": len(cases), "measured": len(per_case),
        "wall_s": round(wall, 1),
        "per_case_s": {"median": round(statistics.median(per_case), 2),
                       "min": round(min(per_case), 2), "max": round(max(per_case), 2)},
        "registration_s": {m: round(statistics.median(v), 2) for m, v in registration.items()},
        "stages_s": stages,
        "largest_region": {"ml": largest["region"]["ml"], "seconds": largest["seconds"],
                           "stages_s": largest["stages"]},
        "peak_mb": round(peak_mb),
        "features": int(sum(c.startswith(("CT_", "PET_", "MR_T1_")) for c in table.columns)),
        "predicted_positive": int((table["prediction"].astype(str) == "1").sum()),
        "resume_nothing_left_s": round(resumed_all, 1), "resume_status": status_all,
        "resume_five_s": round(resumed_five, 1), "resume_five_status": status_five,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\n| cases | wall (s) | per case median (min-max) s | registration PET / MR s "
          f"| peak MB | --resume, nothing left / 5 left (s) |\n|---|---|---|---|---|---|\n"
          f"| {summary['measured']} of {summary['cases']} | {summary['wall_s']} | "
          f"{summary['per_case_s']['median']} ({summary['per_case_s']['min']}-"
          f"{summary['per_case_s']['max']}) | {summary['registration_s']['PET']} / "
          f"{summary['registration_s']['MR_T1']} | {summary['peak_mb']} | "
          f"{summary['resume_nothing_left_s']} / {summary['resume_five_s']} |")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
