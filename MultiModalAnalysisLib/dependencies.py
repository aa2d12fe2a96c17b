"""What the engine needs inside Slicer's Python, pinned to the versions it is tested with.

Slicer ships numpy, SimpleITK, scipy and packaging; they are never reinstalled (Slicer's
SimpleITK has its own IO and replacing it breaks Slicer). torch is installed by the PyTorch
extension's ``PyTorchUtils`` (it picks the CUDA build that matches the driver) with the version
range below, so an old torch 1.x or an unpinned newest one is never pulled in. Everything else
comes from pip. A test keeps these pins in step with ``pyproject.toml`` and with the versions
the test suite runs against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: Shipped with Slicer: never installed by the module.
PROVIDED_BY_SLICER = ("numpy", "SimpleITK", "scipy", "packaging")

#: torch, installed through PyTorchUtils (its version range, without the name).
TORCH_VERSION_RANGE = ">=2.3,<2.14"

#: Installed with pip: lower bound from pyproject.toml, upper bound below the first release
#: the engine was not tested with.
PIP_REQUIREMENTS = (
    "monai>=1.3,<1.7",
    "scikit-learn>=1.8,<1.10",
    "pandas>=2.0,<3.2",
    "scikit-image>=0.22,<0.27",
    "matplotlib>=3.7,<3.12",
    "tqdm>=4.60,<5",
    "pyyaml>=5.4,<7",
    "PyWavelets>=1.5,<2",
)


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclass
class DependencyStatus:
    """What is missing (or at a version outside its pin)."""

    pip: list[str] = field(default_factory=list)  # requirement strings to pip-install
    torch: str | None = None  # "torch<range>" when torch must be (re)installed
    found: dict[str, str | None] = field(default_factory=dict)  # name -> installed version

    @property
    def satisfied(self) -> bool:
        return not self.pip and self.torch is None

    def describe(self) -> str:
        """The confirmation text: every package that will be installed, and why."""
        if self.satisfied:
            return "All Python packages MultiModalAnalysis needs are installed."
        lines = ["MultiModalAnalysis needs these Python packages, which will now be installed:"]
        if self.torch is not None:
            have = self.found.get("torch")
            lines.append(
                f"  - {self.torch} (PyTorch, through the PyTorch extension; the GPU build when "
                f"a CUDA GPU is present){f', replacing {have}' if have else ''}"
            )
        for requirement in self.pip:
            name = _requirement_name(requirement)
            have = self.found.get(name)
            lines.append(f"  - {requirement}{f' (replacing {have})' if have else ''}")
        lines.append(
            "This downloads several hundred MB (more for a GPU build of PyTorch) and can take a "
            "few minutes; Slicer may ask to restart afterwards."
        )
        return "\n".join(lines)


def _requirement_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def check_dependencies(
    installed_version: Callable[[str], str | None] = _installed_version,
) -> DependencyStatus:
    """Compare the installed packages with the pins (no import of the packages themselves).

    Args:
        installed_version: name -> installed version or ``None`` (injectable for tests).
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    status = DependencyStatus()
    torch_version = installed_version("torch")
    status.found["torch"] = torch_version
    torch_ok = torch_version is not None and Requirement(
        f"torch{TORCH_VERSION_RANGE}"
    ).specifier.contains(Version(torch_version).base_version, prereleases=True)
    if not torch_ok:
        status.torch = f"torch{TORCH_VERSION_RANGE}"
    for text in PIP_REQUIREMENTS:
        requirement = Requirement(text)
        have = installed_version(requirement.name)
        status.found[requirement.name] = have
        if have is None or not requirement.specifier.contains(have, prereleases=True):
            status.pip.append(text)
    return status
