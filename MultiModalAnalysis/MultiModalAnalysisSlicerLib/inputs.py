"""The "further volumes" table of the Inputs section, and modality guesses from DICOM tags."""

import qt
import slicer

from MultiModalAnalysisLib.modality_guess import MODALITY_CHOICES, guess_modality

_MODALITY_TAG = "0008,0060"
_SERIES_DESCRIPTION_TAG = "0008,103e"


def dicomTags(volumeNode) -> tuple:
    """(Modality, Series Description) of a volume loaded from DICOM, else (None, None)."""
    uids = volumeNode.GetAttribute("DICOM.instanceUIDs") if volumeNode is not None else None
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return None, None
    uid = uids.split()[0]
    return database.instanceValue(uid, _MODALITY_TAG), database.instanceValue(
        uid, _SERIES_DESCRIPTION_TAG
    )


def guessNodeModality(volumeNode) -> str:
    """The modality choice for a volume node, from its DICOM tags, else its name."""
    if volumeNode is None:
        return "other"
    modality, description = dicomTags(volumeNode)
    return guess_modality(volumeNode.GetName() or "", modality, description)


class InputVolumesTable:
    """Keeps a QTableWidget of (volume, modality, landmarks) rows and three parameter-node
    lists in step.

    Each row has a volume selector, a modality combo box and an optional point-list selector
    (landmarks clicked on that volume, paired with the reference landmarks); choosing a
    volume guesses its modality (the user can change it). ``onChanged(volumes, modalities,
    landmarks)`` is called after every edit (``landmarks[i]`` is a node or None);
    :meth:`setRows` fills the table from the parameter node.
    """

    def __init__(self, tableWidget, onChanged):
        self.table = tableWidget
        self.onChanged = onChanged
        self._updating = False
        self.table.setColumnCount(3)
        self.table.setHorizontalHeaderLabels(["Volume", "Modality", "Landmarks"])
        self.table.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)

    def _addRowWidgets(self, node, modality, landmarks=None):
        row = self.table.rowCount
        self.table.insertRow(row)
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.showChildNodeTypes = False  # no labelmaps or vector volumes
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.noneEnabled = True
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setCurrentNode(node)
        combo = qt.QComboBox()
        combo.addItems(list(MODALITY_CHOICES))
        combo.currentText = modality if modality in MODALITY_CHOICES else "other"
        # Guess the modality when the user picks a volume (nodeActivated), not when rows are
        # rebuilt from a restored scene.
        selector.connect("nodeActivated(vtkMRMLNode*)", lambda n, c=combo: self._nodeChosen(n, c))
        selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda _node: self._emit())
        combo.connect("currentIndexChanged(int)", lambda _index: self._emit())
        points = slicer.qMRMLNodeComboBox()
        points.nodeTypes = ["vtkMRMLMarkupsFiducialNode"]
        points.addEnabled = True
        points.removeEnabled = False
        points.renameEnabled = True
        points.noneEnabled = True
        points.noneDisplay = "None"
        points.toolTip = ("Optional: the reference landmarks' anatomical points, clicked on this "
                          "volume (paired by label, else in order).")
        points.setMRMLScene(slicer.mrmlScene)
        points.setCurrentNode(landmarks)
        points.connect("currentNodeChanged(vtkMRMLNode*)", lambda _node: self._emit())
        self.table.setCellWidget(row, 0, selector)
        self.table.setCellWidget(row, 1, combo)
        self.table.setCellWidget(row, 2, points)

    def _nodeChosen(self, node, combo):
        if not self._updating and node is not None:
            combo.currentText = guessNodeModality(node)  # emits through currentIndexChanged

    def _emit(self):
        if not self._updating:
            self.onChanged(*self.rows())

    def rows(self):
        """(volumes, modalities, landmarks) as shown; rows without a volume are left out."""
        volumes, modalities, landmarks = [], [], []
        for row in range(self.table.rowCount):
            node = self.table.cellWidget(row, 0).currentNode()
            if node is not None:
                volumes.append(node)
                modalities.append(self.table.cellWidget(row, 1).currentText)
                landmarks.append(self.table.cellWidget(row, 2).currentNode())
        return volumes, modalities, landmarks

    def setRows(self, volumes, modalities, landmarks=()):
        """Show these rows (from the parameter node) without echoing changes back."""
        landmarks = list(landmarks) + [None] * (len(volumes) - len(landmarks))
        wanted = list(zip(volumes, modalities, landmarks, strict=False))
        if list(zip(*self.rows(), strict=True)) == wanted:
            return
        self._updating = True
        try:
            self.table.setRowCount(0)
            for node, modality, points in wanted:
                self._addRowWidgets(node, modality, points)
        finally:
            self._updating = False

    def addRow(self):
        self._addRowWidgets(None, "other")

    def removeSelectedRow(self):
        row = self.table.currentRow()
        if row < 0:
            row = self.table.rowCount - 1
        if row >= 0:
            self.table.removeRow(row)
            self._emit()

    def guessAll(self):
        """Guess every row's modality again from its volume."""
        self._updating = True
        try:
            for row in range(self.table.rowCount):
                node = self.table.cellWidget(row, 0).currentNode()
                if node is not None:
                    self.table.cellWidget(row, 1).currentText = guessNodeModality(node)
        finally:
            self._updating = False
        self._emit()
