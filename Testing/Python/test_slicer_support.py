"""The Qt-free helpers behind the Slicer module: background jobs, modality guesses, standard
terminology and the dependency pins."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import tomllib

from MultiModalAnalysisLib import dependencies
from MultiModalAnalysisLib.errors import ConfigError, OperationCancelled
from MultiModalAnalysisLib.jobs import BackgroundJob
from MultiModalAnalysisLib.modality_guess import MODALITY_CHOICES, guess_modality
from MultiModalAnalysisLib.terminology import terminology_for

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------ background jobs


def test_background_job_keeps_the_caller_responsive_and_returns_the_result():
    def work(progress, cancel):
        for i in range(10):
            progress((i + 1) / 10, f"step {i + 1}")
            time.sleep(0.02)
        return 42

    job = BackgroundJob(work, "counting").start()
    polls = 0
    while not job.wait(0.005):
        polls += 1  # the caller's loop keeps running meanwhile
    assert polls >= 5
    assert job.result() == 42 and job.progress == (1.0, "step 10")


def test_background_job_error_is_raised_in_the_callers_thread():
    def work(progress, cancel):
        raise ConfigError("the metric 'foo' is unknown")

    job = BackgroundJob(work).start()
    job.wait(5)
    assert isinstance(job.error, ConfigError)
    with pytest.raises(ConfigError, match="foo"):
        job.result()


def test_cancel_stops_work_at_its_next_progress_report():
    reached = []

    def work(progress, cancel):
        for i in range(1000):
            progress(i / 1000, "")
            reached.append(i)
            time.sleep(0.005)

    job = BackgroundJob(work, "long step").start()
    time.sleep(0.05)
    job.cancel()
    assert job.wait(2)
    assert job.cancelled and len(reached) < 200
    with pytest.raises(OperationCancelled, match="long step"):
        job.result()


def test_cancel_event_reaches_engine_code_that_checks_it_itself():
    seen = threading.Event()

    def work(progress, cancel):
        while not cancel.is_set():
            time.sleep(0.005)
        seen.set()
        return "stopped cleanly"

    job = BackgroundJob(work).start()
    job.cancel()
    assert job.wait(2) and seen.is_set() and job.result() == "stopped cleanly"


# ---------------------------------------------------------------------------- modality guesses


@pytest.mark.parametrize(
    ("name", "dicom", "description", "expected"),
    [
        ("CT_image", None, None, "CT"),
        ("PET_image", None, None, "PET"),
        ("MR_T1_image", None, None, "MR-T1"),
        ("BraTS-GLI-00001-000-t2f", None, None, "FLAIR"),
        ("BraTS-GLI-00001-000-t2w", None, None, "MR-T2"),
        ("BraTS-GLI-00001-000-t1c", None, None, "MR-T1"),
        ("3: Unnamed Series", "PT", "WB FDG AC", "PET"),
        ("5: Series", "MR", "AX T2 FLAIR", "FLAIR"),
        ("6: Series", "MR", "t2_tse_tra", "MR-T2"),
        ("7: Series", "MR", "localizer", "MR-T1"),
        ("2: Series", "CT", "Abdomen 5mm", "CT"),
        ("volume", None, None, "other"),
    ],
)
def test_modality_guess_from_names_and_dicom_tags(name, dicom, description, expected):
    guess = guess_modality(name, dicom, description)
    assert guess == expected and guess in MODALITY_CHOICES


# ------------------------------------------------------------------------- standard terminology


def test_common_segment_names_get_slicer_general_anatomy_codes():
    assert terminology_for("Tumour").type == ("SCT", "4147007", "Mass")
    assert terminology_for("GTV_Mass").type == ("SCT", "4147007", "Mass")
    assert terminology_for("peritumoural oedema").type[2] == "Edema"
    assert terminology_for("adipose tissue").type == ("SCT", "248300009", "Body fat")
    assert terminology_for("class 2") is None


# --------------------------------------------------------------------------- dependency pins


def _pyproject_dependencies() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    result = {}
    for text in data["project"]["dependencies"]:
        name = re.split(r"[<>=!~ \[;]", text, maxsplit=1)[0]
        result[name.lower()] = text
    return result


def _lower_bound(text: str) -> str | None:
    match = re.search(r">=\s*([\w.]+)", text)
    return match.group(1) if match else None


def test_slicer_pins_cover_every_engine_dependency_with_the_same_lower_bound():
    from packaging.requirements import Requirement

    pinned = {Requirement(r).name.lower(): r for r in dependencies.PIP_REQUIREMENTS}
    pinned["torch"] = f"torch{dependencies.TORCH_VERSION_RANGE}"
    provided = {name.lower() for name in dependencies.PROVIDED_BY_SLICER}
    problems = []
    for name, text in _pyproject_dependencies().items():
        if name in provided:
            continue
        if name not in pinned:
            problems.append(f"{name} (pyproject: {text}) is missing from "
                            "MultiModalAnalysisLib/dependencies.py PIP_REQUIREMENTS")
        elif _lower_bound(pinned[name]) != _lower_bound(text):
            problems.append(f"{name}: pyproject says {text}, dependencies.py {pinned[name]}")
    assert not problems, "\n".join(problems)


def test_the_versions_the_tests_run_with_satisfy_the_slicer_pins():
    status = dependencies.check_dependencies()
    outside = status.pip + ([status.torch] if status.torch else [])
    assert status.satisfied, (
        f"installed versions {status.found} fall outside the Slicer pins {outside}: test the "
        "engine with them, then widen the pins in MultiModalAnalysisLib/dependencies.py."
    )


def test_missing_packages_are_listed_in_one_confirmation_message():
    installed = {"torch": "1.13.1", "monai": "1.4.0", "pandas": None}

    def version_of(name):
        return installed.get(name, "0.0") if name != "tqdm" else "4.66.0"

    status = dependencies.check_dependencies(version_of)
    assert not status.satisfied
    assert status.torch == f"torch{dependencies.TORCH_VERSION_RANGE}"
    assert "monai>=1.3,<1.7" not in status.pip
    assert "pandas>=2.0,<3.2" in status.pip and "tqdm>=4.60,<5" not in status.pip
    text = status.describe()
    assert "replacing 1.13.1" in text and "pandas>=2.0,<3.2" in text
    assert "SimpleITK" not in text  # Slicer's own SimpleITK is never replaced
