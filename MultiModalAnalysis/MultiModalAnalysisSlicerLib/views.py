"""Showing results in Slicer's views: fused slices, segmentations in 2-D and 3-D, tables."""

import slicer


def showFused(background, foreground, opacity: float) -> None:
    """Reference in the background, ``foreground`` over it, in every slice view."""
    slicer.util.setSliceViewerLayers(
        background=background, foreground=foreground, foregroundOpacity=opacity, fit=True
    )


def showSegmentation(segmentationNode, referenceVolume, show3D: bool = True) -> None:
    """The segmentation over its reference volume in 2-D, and its surfaces in 3-D."""
    if referenceVolume is not None:
        slicer.util.setSliceViewerLayers(background=referenceVolume, fit=True)
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetVisibility(True)
        displayNode.SetVisibility2DFill(True)
        displayNode.SetVisibility3D(show3D)
    if show3D:
        segmentationNode.CreateClosedSurfaceRepresentation()
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()


def showTable(tableNode) -> None:
    """A table in the layout's table view (switching to a layout that has one)."""
    layoutManager = slicer.app.layoutManager()
    if layoutManager is None:
        return
    layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    selectionNode = slicer.app.applicationLogic().GetSelectionNode()
    selectionNode.SetActiveTableID(tableNode.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
