"""MedSAM for 3D Slicer: boxes (or RECIST lines) on a few keyframe slices -> a 3D segment to refine.

The widget is thin: it reads the panel, hands arrays to ``MedSAMSlicerLib.logic`` and the HTTP client, runs
the server call in a worker thread (polled by a QTimer, so the UI never blocks) and writes the result into
the selected segment as one Segment Editor undo step. Nothing is installed when the module loads: the local
server is installed into Slicer's Python only after the user presses Segment and confirms.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import traceback

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSAMSlicerLib import client as medsam_client
from MedSAMSlicerLib import errors, geometry, keyframes, local_server, protocol, run, segments, timing

SETTINGS = "MedSAMSlicer/"
SERVER_PACKAGE = "medsam-slicer-server"  # pip requirement; a checkout's server/ folder works too (setting)
ADD_BOX_SHORTCUT = "Ctrl+B"


#
# Module
#


class MedSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAMSlicer contributors"]
        self.parent.helpText = """
Segment CT, MR and 2D images with MedSAM or LiteMedSAM. Draw a box around the target on a few keyframe slices
(every 3-10 slices), press <b>Segment</b>, then correct the result in the Segment Editor (<b>Refine</b>).
Slices you edit by hand are kept when you segment again. The model runs in a server: on this computer
(installed on first use) or on a remote GPU machine.
"""
        self.parent.acknowledgementText = """
MedSAM: J. Ma, Y. He, F. Li, L. Han, C. You, B. Wang. Segment anything in medical images.
Nature Communications 15, 654 (2024). LiteMedSAM from the MedSAM authors (bowang-lab).
"""


class InstallError(Exception):
    """The server package could not be made ready; ``restartRequired`` says whether restarting Slicer fixes it."""

    def __init__(self, message: str, restartRequired: bool = False):
        super().__init__(message)
        self.message = message
        self.restartRequired = restartRequired

    def __str__(self) -> str:
        return self.message


#
# Logic: Slicer-specific parts (installing, the local server); the rest is MedSAMSlicerLib.logic
#


class MedSAMSlicerLogic(ScriptedLoadableModuleLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.localServer = None

    @staticmethod
    def serverPackageInstalled() -> bool:
        return importlib.util.find_spec("medsam_server") is not None

    def installServerPackage(self, askConfirmation: bool = True, log=logging.info) -> None:
        """Install the MedSAM server into Slicer's Python (PyTorch through the PyTorch extension when present)."""
        if self.serverPackageInstalled():
            return
        requirement = settingsValue("ServerPackage", SERVER_PACKAGE)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "The local MedSAM server is not installed in Slicer's Python yet.\n\n"
            "Install it now? It needs a network connection and may take several minutes "
            "(PyTorch alone is about 1-3 GB).\n\n"
            "To use a server on another computer instead, cancel and choose Remote under Server.",
            "Install the MedSAM server",
            detailedText=f"pip install {requirement}",
        ):
            raise InstallError("Installation cancelled. Choose Remote under Server to use a server elsewhere.")
        try:
            import PyTorchUtils  # the PyTorch extension picks the right CUDA build
        except ModuleNotFoundError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                log("Installing PyTorch (PyTorch extension)...")
                if torchLogic.installTorch(askConfirmation=False) is None:
                    raise InstallError("PyTorch could not be installed. Use the PyTorch Util module to install it.")
        log(f"Installing {requirement} ...")
        slicer.util.pip_install(requirement)
        importlib.invalidate_caches()
        if not self.serverPackageInstalled():
            raise InstallError("The MedSAM server was installed but Python cannot import it yet. "
                               "Restart Slicer to finish the installation.", restartRequired=True)
        log("The MedSAM server is installed.")

    def startLocalServer(self, model: str) -> tuple[str, str]:
        """Start (or reuse) ``medsam serve`` on 127.0.0.1 with a random token; returns (url, token)."""
        if self.localServer is not None and self.localServer.running and self.localServer.model == model:
            return self.localServer.url, self.localServer.token
        self.stopLocalServer()
        python = shutil.which("PythonSlicer") or sys.executable
        server = local_server.LocalServer(python=python, extra_args=["--model", model])
        server.model = model
        self.localServer = server
        return server.start()

    def stopLocalServer(self) -> None:
        if self.localServer is not None:
            self.localServer.stop()
            self.localServer = None


def settingsValue(key: str, default):
    return qt.QSettings().value(SETTINGS + key, default)


def setSettingsValue(key: str, value) -> None:
    qt.QSettings().setValue(SETTINGS + key, value)


def segmentEditorWidget():
    """The Segment Editor module's editor widget (its undo history is the one users see), or None."""
    if not hasattr(slicer.modules, "segmenteditor"):
        return None
    return slicer.modules.segmenteditor.widgetRepresentation().self().editor


def showInSegmentEditor(volumeNode, segmentationNode, segmentId=None):
    editor = segmentEditorWidget()
    if editor is None:
        return None
    editor.setSegmentationNode(segmentationNode)
    if hasattr(editor, "setSourceVolumeNode"):
        editor.setSourceVolumeNode(volumeNode)
    else:  # Slicer < 5.2
        editor.setMasterVolumeNode(volumeNode)
    if segmentId:
        editor.setCurrentSegmentID(segmentId)
    return editor


#
# Widget
#


class MedSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._executor = None
        self._pending = []  # (future, callback) polled by _pollTimer
        self._run = None  # the Segment run in flight: dict(future, cancel, request)
        self._progress = ("", 0, 0)
        self._progressLock = threading.Lock()
        self._session = None  # (key, session handle) of the last uploaded volume
        self._recorder = None
        self._placing = None  # (markups node, kind) while the user draws a keyframe
        self._shortcut = None

    # ---------------------------------------------------------------- set-up and teardown

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAMSlicerLogic()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="MedSAM")

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._poll)
        self._clockTimer = qt.QTimer()
        self._clockTimer.setInterval(500)
        self._clockTimer.connect("timeout()", self._updateClock)
        self._keyframeTimer = qt.QTimer()  # coalesces bursts of scene events into one table refresh
        self._keyframeTimer.setSingleShot(True)
        self._keyframeTimer.setInterval(50)
        self._keyframeTimer.connect("timeout()", self._refreshKeyframes)

        ui = self.ui
        ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.addSegmentButton.connect("clicked()", self.onAddSegment)
        for name in protocol.MODEL_NAMES:  # the panel's names come from the protocol, nowhere else
            ui.modelComboBox.addItem(protocol.MODEL_LABELS[name], name)
        for name in protocol.WINDOW_NAMES:
            ui.windowComboBox.addItem(protocol.WINDOW_LABELS[name], name)
        ui.modelComboBox.connect("currentIndexChanged(int)", lambda i: setSettingsValue("Model", self._model()))
        ui.windowComboBox.connect("currentIndexChanged(int)", lambda i: setSettingsValue("Window", self._window()))
        ui.addBoxButton.connect("clicked()", self.onAddBox)
        ui.addLinesButton.connect("clicked()", self.onAddLines)
        ui.keyframeTable.connect("cellDoubleClicked(int,int)", lambda row, column: self.onJumpToKeyframe())
        ui.keyframeTable.connect("itemSelectionChanged()", self._updateButtons)
        ui.jumpToKeyframeButton.connect("clicked()", self.onJumpToKeyframe)
        ui.deleteKeyframeButton.connect("clicked()", self.onDeleteKeyframe)
        ui.segmentButton.connect("clicked()", self.onSegment)
        ui.cancelButton.connect("clicked()", self.onCancel)
        ui.refineButton.connect("clicked()", self.onRefine)
        ui.localServerRadioButton.connect("toggled(bool)", self.onServerModeChanged)
        ui.serverUrlLineEdit.connect("editingFinished()", self._saveServerSettings)
        ui.serverTokenLineEdit.connect("editingFinished()", self._saveServerSettings)
        ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        ui.startCaseButton.connect("clicked()", self.onStartCase)
        ui.pauseButton.connect("toggled(bool)", self.onPause)
        ui.finishCaseButton.connect("clicked()", self.onFinishCase)
        ui.studyFolderPathLineEdit.connect("currentPathChanged(QString)", lambda p: setSettingsValue("StudyFolder", p))
        ui.annotatorLineEdit.connect("editingFinished()",
                                     lambda: setSettingsValue("Annotator", ui.annotatorLineEdit.text))

        self._shortcut = qt.QShortcut(qt.QKeySequence(settingsValue("AddBoxShortcut", ADD_BOX_SHORTCUT)),
                                      slicer.util.mainWindow())
        self._shortcut.connect("activated()", self.onAddBox)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._onSceneNodesChanged)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self._onInteractionModeChanged)

        self._restoreSettings()
        if not ui.volumeSelector.currentNode():
            ui.volumeSelector.setCurrentNode(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode"))
        self._updateButtons()

    def cleanup(self):
        if self._run is not None:
            self._run["cancel"].set()
        self._pollTimer.stop()
        self._clockTimer.stop()
        self.removeObservers()
        if self._shortcut is not None:
            self._shortcut.setParent(None)
            self._shortcut = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self.logic is not None:
            self.logic.stopLocalServer()
        if self._recorder is not None and not self._recorder.finished:
            self._recorder.close()  # the running phase is not recorded; finished lines stay

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run["cancel"].set()
        self._session = None

    def _restoreSettings(self):
        ui = self.ui
        ui.modelComboBox.setCurrentIndex(max(0, ui.modelComboBox.findData(settingsValue("Model", ""))))
        ui.windowComboBox.setCurrentIndex(max(0, ui.windowComboBox.findData(settingsValue("Window", ""))))
        # texts before the radio buttons: toggling a button saves the server settings from the line edits
        ui.serverUrlLineEdit.text = settingsValue("RemoteUrl", "")
        ui.serverTokenLineEdit.text = settingsValue("RemoteToken", "")
        ui.studyFolderPathLineEdit.currentPath = settingsValue("StudyFolder", "")
        ui.annotatorLineEdit.text = settingsValue("Annotator", "")
        remote = settingsValue("ServerMode", "local") == "remote"
        ui.remoteServerRadioButton.setChecked(remote)
        ui.localServerRadioButton.setChecked(not remote)
        self.onServerModeChanged(not remote)

    def _saveServerSettings(self):
        setSettingsValue("ServerMode", "local" if self.ui.localServerRadioButton.checked else "remote")
        setSettingsValue("RemoteUrl", self.ui.serverUrlLineEdit.text.strip())
        setSettingsValue("RemoteToken", self.ui.serverTokenLineEdit.text.strip())

    # ---------------------------------------------------------------- selections

    def _inputs(self, needSegment: bool = True):
        """(volume, segmentation, segment ID) from the panel; errors say what to select."""
        volumeNode = self.ui.volumeSelector.currentNode()
        if volumeNode is None:
            raise ValueError("Select a volume first.")
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            self.ui.segmentationSelector.setCurrentNode(segmentationNode)
        segmentId = self.ui.segmentSelector.currentSegmentID()
        if needSegment and not segmentId:
            if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
                segmentId = self.onAddSegment()
            else:
                raise ValueError("Select a segment first (or press Add).")
        return volumeNode, segmentationNode, segmentId

    def onVolumeChanged(self, node):
        self._session = None
        self._scheduleKeyframeRefresh()

    def onSegmentationChanged(self, node):
        self.ui.segmentSelector.setCurrentNode(node)
        if node is not None and self.ui.volumeSelector.currentNode() is not None:
            reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
            if reference is None:
                node.SetReferenceImageGeometryParameterFromVolumeNode(self.ui.volumeSelector.currentNode())
        self._scheduleKeyframeRefresh()

    def onSegmentChanged(self, segmentId):
        self._scheduleKeyframeRefresh()

    def onAddSegment(self):
        with slicer.util.tryWithErrorDisplay("Could not add a segment."):
            segmentationNode = self.ui.segmentationSelector.currentNode()
            if segmentationNode is None:
                _, segmentationNode, _ = self._inputs(needSegment=False)
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment()
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)
            return segmentId

    # ---------------------------------------------------------------- keyframes

    def onAddBox(self):
        with slicer.util.tryWithErrorDisplay("Could not start drawing a box."):
            self._startKeyframe("vtkMRMLMarkupsROINode", "box")

    def onAddLines(self):
        with slicer.util.tryWithErrorDisplay("Could not start drawing RECIST lines."):
            self._startKeyframe("vtkMRMLMarkupsLineNode", "long axis")

    def _startKeyframe(self, className: str, kind: str):
        _, segmentationNode, segmentId = self._inputs()
        segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        name = slicer.mrmlScene.GenerateUniqueName(f"{segmentName} {kind}")
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        keyframes.tag_keyframe(node, segmentationNode, segmentId)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(1.0, 0.82, 0.0)
        if className == "vtkMRMLMarkupsROINode":
            display.SetFillOpacity(0.0)
        self._placing = (node, kind)
        self.addObserver(node, node.PointPositionDefinedEvent, self._onFirstPointPlaced)
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(className)
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)
        self.ui.statusLabel.text = f"Draw the {kind} in a slice view."

    def _onInteractionModeChanged(self, caller, event):
        if self._placing is None or caller.GetCurrentInteractionMode() == caller.Place:
            return
        node, kind = self._placing
        self._placing = None
        # deferred: the markup finishes its own update before it is snapped onto its slice
        qt.QTimer.singleShot(0, lambda: self._keyframePlaced(node, kind))

    def _keyframePlaced(self, node, kind):
        if node.GetScene() is None:
            return
        volumeNode = self.ui.volumeSelector.currentNode()
        if volumeNode is None:
            return
        keyframe, status = keyframes.finish_placement(node, geometry.volume_array(volumeNode, copy=False))
        self.ui.statusLabel.text = status
        if keyframe is not None and kind == "long axis":
            with slicer.util.tryWithErrorDisplay("Could not start drawing the short axis."):
                self._startKeyframe("vtkMRMLMarkupsLineNode", "short axis")
        self._scheduleKeyframeRefresh()

    def _onFirstPointPlaced(self, node, event):
        """The first click of a keyframe: remember the view it is drawn in (see keyframes.record_placement)."""
        if node.GetNumberOfDefinedControlPoints() == 1 and node.GetNodeReference(keyframes.VIEW_ROLE) is None:
            crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
            keyframes.record_placement(node, crosshair)

    def _onSceneNodesChanged(self, caller, event):
        self._scheduleKeyframeRefresh()

    def _scheduleKeyframeRefresh(self):
        if hasattr(self, "_keyframeTimer"):
            self._keyframeTimer.start()

    def _refreshKeyframes(self):
        table = self.ui.keyframeTable
        table.setRowCount(0)
        volumeNode = self.ui.volumeSelector.currentNode()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        segmentId = self.ui.segmentSelector.currentSegmentID()
        if segmentationNode is None or not segmentId:
            self.ui.keyframeCountLabel.text = ""
            self._updateButtons()
            return
        rois, lines = keyframes.keyframe_nodes(segmentationNode, segmentId)
        rows = []
        volume = axis = None
        if volumeNode is not None and volumeNode.GetImageData() is not None:
            try:
                volume = geometry.volume_array(volumeNode, copy=False)
                axis = keyframes.slicing_axis(volume, rois, lines)
            except errors.InputError:
                volume = None
        for node in rois + lines:
            sliceText, promptText, problem = "?", "", ""
            try:
                if volume is not None and node.IsA("vtkMRMLMarkupsROINode"):
                    keyframe = keyframes.roi_keyframe(node, volume, axis)
                    sliceText, promptText = str(keyframe.slice), "box {} {} - {} {}".format(*keyframe.box)
                elif volume is not None:
                    keyframe = keyframes.line_keyframe(node, volume, axis)
                    sliceText, promptText = str(keyframe.slice), "line"
            except errors.InputError as error:
                problem = str(error)
            rows.append((int(sliceText) if sliceText.isdigit() else 10**9, sliceText, promptText, node, problem))
        for _, sliceText, promptText, node, problem in sorted(rows, key=lambda r: (r[0], r[3].GetName())):
            row = table.rowCount
            table.insertRow(row)
            for column, text in enumerate((sliceText, promptText, node.GetName())):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, node.GetID())
                if problem:
                    item.setToolTip(problem)
                    item.setForeground(qt.QBrush(qt.QColor("red")))
                table.setItem(row, column, item)
        count = len({r[1] for r in rows})
        self.ui.keyframeCountLabel.text = f"{count} keyframe{'s' if count != 1 else ''}"
        self._updateButtons()

    def _selectedKeyframeNode(self):
        items = self.ui.keyframeTable.selectedItems()
        if not items:
            return None
        return slicer.mrmlScene.GetNodeByID(items[0].data(qt.Qt.UserRole))

    def onJumpToKeyframe(self):
        node = self._selectedKeyframeNode()
        if node is not None:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(node.GetID(), 0, True)

    def onDeleteKeyframe(self):
        node = self._selectedKeyframeNode()
        if node is not None:
            slicer.mrmlScene.RemoveNode(node)

    # ---------------------------------------------------------------- server

    def onServerModeChanged(self, local: bool):
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.serverUrlLabel,
                       self.ui.serverTokenLabel):
            widget.enabled = not local
        self._saveServerSettings()
        self._session = None

    def _model(self) -> str:
        return self.ui.modelComboBox.currentData or protocol.MODEL_NAMES[0]

    def _window(self) -> str:
        return self.ui.windowComboBox.currentData or protocol.WINDOW_NAMES[0]

    def _serverAddress(self, install: bool = True) -> tuple[str, str, bool]:
        """(url, token, local) of the server to use; installs (after asking) and starts the local one."""
        if self.ui.localServerRadioButton.checked:
            if install:
                self.logic.installServerPackage(askConfirmation=True, log=self._log)
            elif not self.logic.serverPackageInstalled():
                raise InstallError("The local server is not installed yet; press Segment to install it.")
            url, token = self.logic.startLocalServer(self._model())
            return url, token, True
        url = self.ui.serverUrlLineEdit.text.strip()
        if not url:
            raise ValueError("Enter the remote server's URL under Server (e.g. http://127.0.0.1:8765 through an "
                             "SSH tunnel).")
        return url, self.ui.serverTokenLineEdit.text.strip(), False

    def _makeClient(self, url: str, token: str):
        return medsam_client.MedSAMClient(url, token=token or None)

    def onTestConnection(self):
        self.ui.serverStatusLabel.text = "Connecting..."
        try:
            url, token, local = self._serverAddress(install=False)
        except Exception as error:  # noqa: BLE001 - shown to the user as the connection status
            self.ui.serverStatusLabel.text = str(error)
            return
        client = self._makeClient(url, token)
        localServer = self.logic.localServer if local else None

        def probe():
            if localServer is not None:
                localServer.wait_ready(client.info, timeout=120)
            return client.check_compatible()  # VersionMismatch names the side to update

        def done(future):
            error = future.exception()
            if error is not None:
                self.ui.serverStatusLabel.text = f"No connection to {url}: {error}"
            else:
                self.ui.serverStatusLabel.text = f"Connected to {url}: {describeInfo(future.result())}"

        self._submit(probe, done)

    # ---------------------------------------------------------------- segment

    def _log(self, text: str):
        logging.info(text)
        self.ui.statusLabel.text = text
        slicer.app.processEvents()  # one repaint so that the message shows before a long blocking install

    def onSegment(self):
        if self._run is not None:
            return
        try:
            url, token, local = self._serverAddress(install=True)
        except InstallError as error:
            self._handleInstallError(error)
            return
        except Exception as error:  # noqa: BLE001 - pip, a missing URL, a server that cannot start: all shown
            self.ui.statusLabel.text = f"The MedSAM server is not ready: {error}"
            slicer.util.errorDisplay(f"The MedSAM server is not ready.\n\n{error}", detailedText=traceback.format_exc())
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            volumeNode, segmentationNode, segmentId = self._inputs()
            request = run.prepare_run(volumeNode, segmentationNode, segmentId, window=self._window())
            client = self._makeClient(url, token)
            key = (url, volumeNode.GetID(), volumeNode.GetImageData().GetMTime(), self._model())
            session = self._session[1] if self._session is not None and self._session[0] == key else None
            localServer = self.logic.localServer if local else None
            cancel = threading.Event()
            self._progress = ("starting", 0, 0)  # (phase, done, total)

            def work():
                if localServer is not None:
                    self._onProgress(0, 0, "starting the local server")
                    localServer.wait_ready(client.info, cancel=cancel)
                if session is None:
                    client.check_compatible()
                    self._onProgress(0, 0, "uploading")
                try:
                    return run.execute_run(client, request, session=session, progress=self._onProgress,
                                             cancel=cancel)
                except medsam_client.UnknownSession:  # the server dropped an idle session: upload again
                    return run.execute_run(client, request, progress=self._onProgress, cancel=cancel)

            self._recordInference(begin=True, request=request)
            future = self._submit(work, self._onRunFinished)
            self._run = {"future": future, "cancel": cancel, "request": request, "key": key}
            self.ui.statusLabel.text = "Segmenting " + (f"(locked slices {request.locked_slices})..."
                                                        if request.locked_slices else "...")
            for note in request.notes:
                logging.info(note)
            self._updateButtons()

    def _handleInstallError(self, error: InstallError):
        self.ui.statusLabel.text = str(error)
        if error.restartRequired:
            if slicer.util.confirmOkCancelDisplay("Slicer must restart to finish installing the MedSAM server.\n"
                                                  "Press OK to restart now.", "Restart required"):
                slicer.util.restart()
        else:
            slicer.util.errorDisplay(f"The MedSAM server is not ready.\n\n{error}")

    def _onProgress(self, done, total, phase="segmenting"):
        """Called from the worker thread (the client's ``progress(done, total)``): stores; _poll shows it."""
        with self._progressLock:
            self._progress = (str(phase), int(done), int(total))

    def onCancel(self):
        if self._run is not None:
            self._run["cancel"].set()
            self.ui.statusLabel.text = "Cancelling..."

    def _submit(self, function, callback):
        future = self._executor.submit(function)
        self._pending.append((future, callback))
        self._pollTimer.start()
        return future

    def _poll(self):
        if self._run is not None:
            with self._progressLock:
                phase, done, total = self._progress
            self.ui.progressBar.setMaximum(max(total, 1) if total else 0)  # 0 = busy indicator
            self.ui.progressBar.setValue(done)
            self.ui.progressBar.setFormat(f"{phase} %v/%m" if total else phase)
        finished, pending = [], []
        for entry in self._pending:  # one done() per future: a run may finish while this loop runs
            (finished if entry[0].done() else pending).append(entry)
        self._pending = pending
        if not self._pending:
            self._pollTimer.stop()
        for future, callback in finished:
            callback(future)

    def _onRunFinished(self, future):
        inFlight, self._run = self._run, None
        self.ui.progressBar.setMaximum(100)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat("%p%")
        self._updateButtons()
        request = inFlight["request"]
        error = future.exception()
        if inFlight["cancel"].is_set():
            self.ui.statusLabel.text = "Cancelled: nothing was written."
            self._recordInference(begin=False, ok=False)
            return
        if error is not None:
            self._session = None
            self.ui.statusLabel.text = f"Segmentation failed: {error}"
            self._recordInference(begin=False, ok=False)
            detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            slicer.util.errorDisplay(f"Segmentation failed; nothing was written.\n\n{error}", detailedText=detail)
            return
        result = future.result()
        self._session = (inFlight["key"], result.session)
        volumeNode = slicer.mrmlScene.GetNodeByID(request.volume_node_id)
        segmentationNode = slicer.mrmlScene.GetNodeByID(request.segmentation_node_id)
        try:
            with slicer.util.tryWithErrorDisplay("Could not write the result into the segment."):
                if volumeNode is None or segmentationNode is None:
                    raise ValueError("The volume or the segmentation was deleted during the run.")

                def saveUndoState():
                    editor = showInSegmentEditor(volumeNode, segmentationNode, request.segment_id)
                    if editor is not None:
                        editor.saveStateForUndo()

                applied = run.apply_run(request, result, volumeNode, segmentationNode, saveUndoState)
        except Exception:  # noqa: BLE001 - already shown by tryWithErrorDisplay
            self._recordInference(begin=False, ok=False)
            return
        self._recordInference(begin=False, ok=True, seconds=result.server_seconds)
        locked = f"; kept {len(applied.locked_slices)} hand-edited slice(s)" if applied.locked_slices else ""
        self.ui.statusLabel.text = (f"Done in {result.seconds:.1f} s: {len(applied.changed_slices)} slice(s) "
                                    f"changed{locked}. Undo in the Segment Editor if needed.")
        segmentationNode.CreateDefaultDisplayNodes()

    def onRefine(self):
        with slicer.util.tryWithErrorDisplay("Could not open the Segment Editor."):
            volumeNode, segmentationNode, segmentId = self._inputs()
            slicer.util.selectModule("SegmentEditor")
            showInSegmentEditor(volumeNode, segmentationNode, segmentId)

    def _updateButtons(self):
        ui = self.ui
        busy = self._run is not None
        haveVolume = ui.volumeSelector.currentNode() is not None
        haveKeyframes = ui.keyframeTable.rowCount > 0
        ui.segmentButton.enabled = haveVolume and haveKeyframes and not busy
        ui.cancelButton.enabled = busy
        ui.addBoxButton.enabled = haveVolume and not busy
        ui.addLinesButton.enabled = haveVolume and not busy
        ui.refineButton.enabled = haveVolume and ui.segmentationSelector.currentNode() is not None
        selected = bool(ui.keyframeTable.selectedItems())
        ui.jumpToKeyframeButton.enabled = selected
        ui.deleteKeyframeButton.enabled = selected and not busy

    # ---------------------------------------------------------------- timing study

    def onStartCase(self):
        with slicer.util.tryWithErrorDisplay("Could not start the case."):
            folder = self.ui.studyFolderPathLineEdit.currentPath
            if not folder:
                raise ValueError("Choose a study folder first.")
            recorder = timing.CaseRecorder(folder, self.ui.annotatorLineEdit.text.strip(),
                                           self.ui.caseLineEdit.text.strip(), self.ui.modeComboBox.currentText,
                                           target=self.ui.targetLineEdit.text.strip())
            path = recorder.start()
            self._recorder = recorder
            self.ui.startCaseButton.enabled = False
            self.ui.pauseButton.enabled = True
            self.ui.finishCaseButton.enabled = True
            self.ui.statusLabel.text = f"Recording to {path}"
            self._clockTimer.start()
            self._updateClock()

    def onPause(self, paused: bool):
        if self._recorder is None or self._recorder.phase is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not pause the clock."):
            if paused:
                self._recorder.pause()
            else:
                self._recorder.resume()
            self.ui.pauseButton.text = "Resume" if paused else "Pause"
            self._updateClock()

    def onFinishCase(self):
        if self._recorder is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not finish the case."):
            record = self._recorder.finish(slices_segmented=self._segmentedSliceCount())
            self._clockTimer.stop()
            self._updateClock()
            self.ui.startCaseButton.enabled = True
            self.ui.pauseButton.setChecked(False)
            self.ui.pauseButton.enabled = False
            self.ui.finishCaseButton.enabled = False
            self.ui.statusLabel.text = (f"Case {self._recorder.case} finished: {record['active_seconds']:.0f} s "
                                        f"active; saved to {self._recorder.path}")

    def _segmentedSliceCount(self):
        try:
            volumeNode, segmentationNode, segmentId = self._inputs()
            array = segments.segment_array(segmentationNode, segmentId, volumeNode)
            axis = keyframes.slicing_axis(geometry.volume_array(volumeNode, copy=False),
                                      *keyframes.keyframe_nodes(segmentationNode, segmentId))
        except (ValueError, errors.InputError):
            return None
        other = tuple(a for a in (0, 1, 2) if a != 2 - axis)
        return int(np.count_nonzero(array.any(axis=other)))

    def _recordInference(self, begin: bool, request=None, ok: bool = True, seconds=None):
        recorder = self._recorder
        if recorder is None or recorder.phase is None or recorder.mode != "assisted":
            return
        try:
            if begin:
                recorder.begin_inference(keyframe_count=request.keyframe_count,
                                         keyframe_spacing=request.keyframe_spacing)
            elif recorder.phase == "inference":
                recorder.end_inference(server_seconds=seconds, ok=ok)
        except timing.TimingError as error:
            self.ui.statusLabel.text = f"Timing study: {error}"
        self._updateClock()

    def _updateClock(self):
        recorder = self._recorder
        if recorder is None:
            self.ui.clockLabel.text = "00:00"
            return
        seconds = int(recorder.elapsed())
        phase = recorder.phase or ("finished" if recorder.finished else "")
        if recorder.paused:
            phase += ", paused"
        self.ui.clockLabel.text = f"{seconds // 60:02d}:{seconds % 60:02d}  {phase.replace('_', ' ')}"


def describeInfo(info) -> str:
    """One line from the server's /info answer."""
    if isinstance(info, dict):
        parts = [f"{key} {info[key]}" for key in ("version", "model", "device") if key in info]
        return ", ".join(parts) or "ok"
    return str(info)


#
# Self-test (runs in Slicer's CTest; needs the server package and a network connection for the sample data)
#


class MedSAMSlicerTest(ScriptedLoadableModuleTest):
    """Loads SampleData CTChest, places keyframe boxes around the right lung, segments it with LiteMedSAM through
    a local server, and checks Dice against the thresholded lung.

    The server package must be importable in Slicer's Python; set MEDSAM_SLICER_TEST_INSTALL=1 to let the test
    install it (otherwise that part is skipped with a message, like other AI extensions' tests)."""

    KEYFRAMES = 5
    MIN_DICE = 0.8

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_keyframes_on_real_ct()
        self.setUp()
        self.test_segment_right_lung()

    def _ctAndLung(self):
        import SampleData

        volumeNode = SampleData.downloadSample("CTChest")
        self.assertIsNotNone(volumeNode)
        volume = geometry.volume_array(volumeNode)
        lung = thresholdedRightLung(volume.array, volume.ijk_to_world)
        keyframeSlices = keyframeSlicesOf(lung, self.KEYFRAMES)
        self.assertEqual(len(keyframeSlices), self.KEYFRAMES, "the thresholded right lung should span many slices")
        return volumeNode, volume, lung, keyframeSlices

    def _placeKeyframes(self, volumeNode, volume, lung, keyframeSlices, segmentationNode, segmentId):
        """One ROI per keyframe in RAS around the lung's bounding box on that slice; returns the expected boxes."""
        expected = {}
        for k in keyframeSlices:
            rows, cols = np.nonzero(lung[k])
            box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
            corners = np.array([[box[0] - 0.5, box[1] - 0.5, k - 0.2], [box[2] + 0.5, box[3] + 0.5, k + 0.2]])
            ras = corners @ volume.ijk_to_world[:3, :3].T + volume.ijk_to_world[:3, 3]
            roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"right lung k{k}")
            roi.SetCenter(*ras.mean(axis=0))
            roi.SetSize(*np.abs(ras[1] - ras[0]))
            keyframes.tag_keyframe(roi, segmentationNode, segmentId)
            expected[k] = box
        return expected

    def test_keyframes_on_real_ct(self):
        self.delayDisplay("Keyframe boxes on CTChest")
        volumeNode, volume, lung, keyframeSlices = self._ctAndLung()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("right lung")
        expected = self._placeKeyframes(volumeNode, volume, lung, keyframeSlices, segmentationNode, segmentId)
        request = run.prepare_run(volumeNode, segmentationNode, segmentId)
        boxes = {b["slice"]: tuple(b["box"]) for b in request.document["segments"][0]["boxes"]}
        self.assertEqual(boxes, expected)
        self.assertEqual(request.locked_slices, [])
        self.delayDisplay("Keyframes map to the right slices and boxes")

    def test_segment_right_lung(self):
        if not MedSAMSlicerLogic.serverPackageInstalled():
            if os.environ.get("MEDSAM_SLICER_TEST_INSTALL") != "1":
                logging.warning("test_segment_right_lung skipped: the MedSAM server is not installed in Slicer's "
                                "Python (set MEDSAM_SLICER_TEST_INSTALL=1 to let the test install it)")
                return
            MedSAMSlicerLogic().installServerPackage(askConfirmation=False)
        self.delayDisplay("Segmenting the right lung of CTChest with LiteMedSAM")
        volumeNode, volume, lung, keyframeSlices = self._ctAndLung()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("right lung")
        self._placeKeyframes(volumeNode, volume, lung, keyframeSlices, segmentationNode, segmentId)

        moduleLogic = MedSAMSlicerLogic()
        try:
            url, token = moduleLogic.startLocalServer(protocol.MODEL_NAMES[0])
            client = medsam_client.MedSAMClient(url, token=token)
            moduleLogic.localServer.wait_ready(client.info, timeout=300)
            applied, result = run.run_segmentation(client, volumeNode, segmentationNode, segmentId)
        finally:
            moduleLogic.stopLocalServer()

        mask = segments.segment_array(segmentationNode, segmentId, volumeNode).astype(bool)
        first, last = keyframeSlices[0], keyframeSlices[-1]
        reference = lung[first:last + 1]
        found = mask[first:last + 1]
        dice = 2.0 * np.logical_and(found, reference).sum() / (found.sum() + reference.sum())
        self.delayDisplay(f"Dice {dice:.3f} over slices {first}..{last} in {result.seconds:.1f} s")
        self.assertGreaterEqual(dice, self.MIN_DICE)
        self.assertTrue(applied.changed_slices and first <= applied.changed_slices[0] <= applied.changed_slices[-1]
                        <= last)
        self.assertFalse(mask[:first].any() or mask[last + 1:].any(), "nothing outside the keyframe range")


def thresholdedRightLung(array: np.ndarray, ijkToWorld: np.ndarray) -> np.ndarray:
    """The patient's right lung of a chest CT (k, j, i) by thresholding, a test reference: per slice, air
    (< -400 HU) inside the body (> -500 HU, closed and filled) on the right side (RAS x beyond the body's
    middle), the largest 2D component with holes filled. On CTChest4 it matches the expert's right lung
    (Dice 0.98; checked headless in Testing/Python/test_self_test_reference.py)."""
    import SimpleITK as sitk

    out = np.zeros(array.shape, dtype=bool)
    nk, nj, ni = array.shape
    jj, ii = np.mgrid[0:nj, 0:ni]
    for k in range(nk):
        plane = array[k]
        # closing first: at low resolution the skin ring has gaps that would let the lungs leak outside
        body = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(
            sitk.GetImageFromArray((plane > -500).astype(np.uint8)), [2, 2])))
        if body.sum() < 100:
            continue
        x = ijkToWorld[0, 0] * ii + ijkToWorld[0, 1] * jj + ijkToWorld[0, 2] * k + ijkToWorld[0, 3]
        middle = 0.5 * (x[body > 0].min() + x[body > 0].max())
        air = (plane < -400) & (body > 0) & (x > middle)
        components = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(
            sitk.GetImageFromArray(air.astype(np.uint8))), minimumObjectSize=30))
        if components.max() == 0:
            continue
        largest = sitk.BinaryFillhole(sitk.GetImageFromArray((components == 1).astype(np.uint8)))
        out[k] = sitk.GetArrayFromImage(largest) > 0
    return out


def keyframeSlicesOf(mask: np.ndarray, count: int) -> list[int]:
    """``count`` slices spread over the longest run of slices where the mask has at least a quarter of its
    largest area (so that stray specks at the ends do not count)."""
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    good = area >= 0.25 * area.max()
    runs, start = [], None
    for k, flag in enumerate(list(good) + [False]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            runs.append((k - start, start, k - 1))
            start = None
    _, first, last = max(runs)
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})
