"""The Add node dialog's command and loopback advice, for each way the collector listens."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pytestqt.qtbot import QtBot

from cloudmon.ui.add_node import AddNodeDialog, agent_url, is_loopback

pytestmark = pytest.mark.gui


def test_all_interfaces_uses_this_machines_name() -> None:
    status = {"listen": "0.0.0.0:8470", "loopback": False}
    assert agent_url("http://127.0.0.1:8470", status) == f"http://{socket.gethostname()}:8470"
    assert not is_loopback("http://127.0.0.1:8470", status)


def test_specific_address_and_unknown_status_keep_the_console_url() -> None:
    assert agent_url("http://10.0.0.5:8470", {"listen": "10.0.0.5:8470", "loopback": False}) == (
        "http://10.0.0.5:8470"
    )
    assert agent_url("http://127.0.0.1:8470", None) == "http://127.0.0.1:8470"
    # Without a status yet, the URL decides.
    assert is_loopback("http://127.0.0.1:9000", None)
    assert not is_loopback("http://collector.example:8470", None)


@pytest.mark.parametrize(
    ("status", "warned"),
    [
        ({"listen": "127.0.0.1:8470", "loopback": True}, True),
        ({"listen": "0.0.0.0:8470", "loopback": False}, False),
    ],
)
def test_dialog_warns_only_on_loopback(qtbot: QtBot, status: dict[str, Any], warned: bool) -> None:
    dialog = AddNodeDialog("http://127.0.0.1:8470", "tok-123", status)
    qtbot.addWidget(dialog)
    assert (dialog.loopback_warning is not None) is warned
    assert dialog.command_field.edit.text().endswith(" --token tok-123")
    if warned:
        assert dialog.loopback_warning is not None
        assert "cloudmon --listen 0.0.0.0:8470" in dialog.loopback_warning.text()


def test_no_token_means_no_token_flag(qtbot: QtBot) -> None:
    dialog = AddNodeDialog("http://127.0.0.1:8470", None, None)
    qtbot.addWidget(dialog)
    assert dialog.command_field.edit.text() == "cloudmon-agent --collector http://127.0.0.1:8470"
