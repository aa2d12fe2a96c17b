"""``python -m MultiModalAnalysisLib`` runs the ``mma`` command line."""

from MultiModalAnalysisLib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
