"""Slicer-side helpers of the MultiModalAnalysis module (need the Slicer application and Qt).

The engine (``MultiModalAnalysisLib``) holds everything that can run without Slicer, node-level
logic included; these files only bind it to the widget: the parameter node, dependency
installation, the input-volume table and view layouts.
"""
