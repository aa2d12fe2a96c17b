"""MultiModalAnalysis engine: preprocessing, registration-based fusion, segmentation and
classification of CT / PET / MR volumes, on ``SimpleITK.Image`` objects.

The engine never imports Slicer at module top level; ``mrml.py`` is the only Slicer-facing
module. See ``README.md`` for the layout and the ``mma`` command line.
"""

from MultiModalAnalysisLib.errors import MMAError

__version__ = "0.1.0"
__all__ = ["MMAError", "__version__"]
