"""run_console(): the entry point the CLI calls, run in-process with a screenshot."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PySide6.QtGui import QImage
from pytestqt.qtbot import QtBot

from cloudmon.collector import CollectorThread
from cloudmon.ui.app import WINDOW_SIZE, run_console
from cloudmon_agent.agent import Agent
from tests.gui.conftest import TOKEN

pytestmark = pytest.mark.gui


def test_run_console_screenshot_logs_first_draw_and_calls_on_close(
    qtbot: QtBot,
    collector: CollectorThread,
    agents: list[Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shot = tmp_path / "shots" / "overview.png"
    closed: list[bool] = []
    with caplog.at_level(logging.INFO, logger="cloudmon.ui.app"):
        code = run_console(
            collector.url, TOKEN, embedded=True, on_close=lambda: closed.append(True), screenshot=shot
        )
    assert code == 0
    assert closed == [True]
    assert any(r.getMessage().startswith("first overview drawn after ") for r in caplog.records)
    image = QImage(str(shot))
    assert not image.isNull()
    assert (image.width(), image.height()) == WINDOW_SIZE
