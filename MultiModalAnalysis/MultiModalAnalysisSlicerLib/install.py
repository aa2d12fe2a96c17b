"""Installing the engine's Python packages into Slicer, once, on first use.

Nothing is installed when the module loads. When a step first needs the engine, the
missing packages are listed in one confirmation dialog; then torch is installed through the
PyTorch extension's ``PyTorchUtils`` (which picks the CUDA build that matches the NVIDIA
driver, or the CPU build) with the tested version range, *before* anything that depends on
torch, so pip never pulls a generic torch wheel of its own. The rest goes through
``slicer.packaging.pip_ensure`` (``slicer.pydeps`` in 5.11 previews) where this Slicer has it,
``slicer.util.pip_install`` otherwise. Slicer's own numpy, SimpleITK and scipy are never
touched.
"""

import logging
import shlex

import slicer

from MultiModalAnalysisLib.dependencies import TORCH_VERSION_RANGE, check_dependencies
from MultiModalAnalysisLib.errors import MMAError

REQUESTER = "MultiModalAnalysis"


class DependencyInstaller:
    """Checks and installs the engine's dependencies; ``ensure()`` before engine work."""

    def __init__(self, askConfirmation: bool = True):
        self.askConfirmation = askConfirmation
        self._ready = False

    def ensure(self) -> None:
        """Return when every dependency is present; otherwise ask once and install.

        Raises:
            MMAError: the user declined, the PyTorch extension is missing, or an install failed
                (the message says what to do).
        """
        if self._ready:
            return
        status = check_dependencies()
        if status.satisfied:
            self._ready = True
            return
        if status.torch is not None:
            self._torchLogic()  # fail early, before asking, when the extension is missing
        confirm = self.askConfirmation and not slicer.app.testingEnabled()
        if confirm and not slicer.util.confirmOkCancelDisplay(
            status.describe(), "MultiModalAnalysis: install Python packages"
        ):
            raise MMAError(
                "the Python packages were not installed, so this step cannot run. Run it "
                "again and accept the installation, or install them from the Python console: "
                + ", ".join(status.pip + ([status.torch] if status.torch else []))
            )
        with slicer.util.WaitCursor():
            if status.torch is not None:
                self._installTorch()
            if status.pip:
                self._pipInstall(status.pip)
        after = check_dependencies()
        if not after.satisfied:
            missing = after.pip + ([after.torch] if after.torch else [])
            raise MMAError(
                f"installing {', '.join(missing)} did not succeed (see the Python console for "
                "pip's output). Check the network connection, restart Slicer and try again."
            )
        self._ready = True

    @staticmethod
    def _torchLogic():
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise MMAError(
                "MultiModalAnalysis needs the PyTorch extension to install PyTorch. Install "
                "'PyTorch' from the Extensions Manager, restart Slicer, then run this step again."
            ) from None
        return PyTorchUtils.PyTorchUtilsLogic()

    def _installTorch(self) -> None:
        logging.info("MultiModalAnalysis: installing torch%s", TORCH_VERSION_RANGE)
        torch = self._torchLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_VERSION_RANGE
        )
        if torch is None:
            raise MMAError(
                f"PyTorch ({TORCH_VERSION_RANGE}) could not be installed. Open the PyTorch Utils "
                "module, install a version in that range, restart Slicer and try again."
            )

    @staticmethod
    def _pipInstall(requirements: list) -> None:
        pipEnsure = None
        for moduleName in ("slicer.packaging", "slicer.pydeps"):
            try:
                module = __import__(moduleName, fromlist=["pip_ensure"])
                pipEnsure = getattr(module, "pip_ensure", None)
            except ImportError:
                continue
            if pipEnsure is not None:
                break
        if pipEnsure is not None:
            from packaging.requirements import Requirement

            # Requirement objects: slicer.pydeps (5.11 previews) takes only those. Already
            # confirmed above: one dialog only.
            pipEnsure(
                [Requirement(r) for r in requirements], prompt_install=False, requester=REQUESTER
            )
        else:
            slicer.util.pip_install(" ".join(shlex.quote(r) for r in requirements))
