"""Shared fixtures: small synthetic volumes with oblique, anisotropic geometry, and the
bundled sample patient. Tests build their own data; none needs the development data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import linear_field_image, rotation_direction

from MultiModalAnalysisLib.sample_data import development_data_dir, sample_case_dir

# Keep torch and BLAS to the CI machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def oblique_image() -> sitk.Image:
    """A 30x24x12 anisotropic (0.8 x 1.1 x 3.0 mm) volume rotated 20/-15/30 degrees."""
    return linear_field_image(
        (30, 24, 12), (0.8, 1.1, 3.0), (-12.0, 7.0, 30.0), rotation_direction((20, -15, 30))
    )


@pytest.fixture
def sample_case_path() -> Path:
    return sample_case_dir()


@pytest.fixture
def dev_data() -> Path:
    """The development data folder; skips the test when it is absent."""
    path = development_data_dir()
    if path is None:
        pytest.skip("development data not found (set MMA_DATA or provide ../shared/data)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def mrml_scene():
    """A real, empty MRML scene (slicer-core), also set as ``slicer.mrmlScene`` for the
    ``slicer.util`` helpers; cleared afterwards."""
    import slicer

    scene = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)
    slicer.mrmlScene = previous
