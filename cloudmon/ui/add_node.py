"""The "Add node…" dialog: the exact commands that connect a machine."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from cloudmon.config import is_loopback_host

# The agent is not on PyPI yet: it installs from the agents/ folder of a checkout.
AGENT_INSTALL = "python3 -m pip install ./agents"
DEFAULT_PORT = 8470


def agent_url(console_url: str, status: dict[str, Any] | None) -> str:
    """The collector URL an agent should use.

    The console may reach the collector on loopback while it listens on all
    interfaces; then agents elsewhere need this machine's name instead of
    ``127.0.0.1``/``0.0.0.0``.
    """
    listen = str((status or {}).get("listen") or "")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        if not listen:
            return console_url
        scheme = urlsplit(console_url).scheme or "http"
        return f"{scheme}://{socket.gethostname()}:{port}"
    return console_url


def is_loopback(console_url: str, status: dict[str, Any] | None) -> bool:
    """Whether the collector accepts agents from this machine only."""
    if status is not None and "loopback" in status:
        return bool(status["loopback"])
    return is_loopback_host(urlsplit(console_url).hostname or "")


def agent_command(url: str, token: str | None) -> str:
    return f"cloudmon-agent --collector {url}" + (f" --token {token}" if token else "")


class CopyField(QWidget):
    """A read-only monospace line with a Copy button."""

    def __init__(self, text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.edit = QLineEdit(text, self)
        self.edit.setReadOnly(True)
        self.edit.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.edit.setCursorPosition(0)
        self.edit.setMinimumWidth(520)
        self.button = QPushButton("Copy", self)
        self.button.setToolTip("Copy to the clipboard")
        self.button.clicked.connect(self.copy)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(self.button)

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self.edit.text())
        self.button.setText("Copied ✓")
        # The button is the context: if the dialog is gone by then, the call is dropped.
        QTimer.singleShot(1500, self.button, lambda: self.button.setText("Copy"))


class AddNodeDialog(QDialog):
    """Explains how to add a node and shows the command to run on it."""

    def __init__(
        self,
        console_url: str,
        token: str | None,
        status: dict[str, Any] | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add node")
        self.setObjectName("addNodeDialog")
        url = agent_url(console_url, status)
        self.url = url
        self.token = token
        self.loopback = is_loopback(console_url, status)

        intro = QLabel(
            "<b>Run the cloudmon agent on the machine you want to watch.</b><br>"
            "It needs Python 3.11+, costs almost nothing and reports once a second. "
            "The node appears in the overview as soon as its first report arrives.",
            self,
        )
        intro.setWordWrap(True)
        step1 = QLabel(
            "1.  Install the agent on the node, from a cloudmon checkout (it needs only psutil):", self
        )
        self.install_field = CopyField(AGENT_INSTALL, self)
        step2 = QLabel("2.  Start it, pointing at this collector:", self)
        self.command_field = CopyField(agent_command(url, token), self)
        self.command_field.setObjectName("agentCommand")
        note = QLabel(
            "The token proves the agent may report here; keep it private.  "
            "Run the agent as a service to keep it going after logout.",
            self,
        )
        note.setWordWrap(True)
        note.setObjectName("dialogNote")

        layout = QVBoxLayout(self)
        layout.setSpacing(8)
        layout.addWidget(intro)
        layout.addSpacing(6)
        layout.addWidget(step1)
        layout.addWidget(self.install_field)
        layout.addWidget(step2)
        layout.addWidget(self.command_field)
        layout.addWidget(note)

        self.loopback_warning: QLabel | None = None
        if self.loopback:
            port = urlsplit(console_url).port or DEFAULT_PORT
            # An ephemeral port would change on restart: suggest the fixed default.
            port = DEFAULT_PORT if port >= 32768 else port
            warn = QLabel(
                "<b>Only agents on this machine can reach this collector:</b> it listens on "
                "loopback (127.0.0.1).<br>To accept agents from other machines, restart with "
                f"<code>cloudmon --listen 0.0.0.0:{port}</code> (the token is already required), "
                "then use this machine's address in the command above.",
                self,
            )
            warn.setWordWrap(True)
            warn.setObjectName("loopbackWarning")
            warn.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            layout.addWidget(warn)
            self.loopback_warning = warn

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        layout.addSpacing(4)
        layout.addWidget(buttons)
        self.setMinimumWidth(660)
