"""The real app process under a real X server saves a screenshot of its overview.

Runs ``python -m cloudmon --data-dir TMP --listen 127.0.0.1:0 --screenshot
ARTIFACTS/overview.png`` with ``QT_QPA_PLATFORM=xcb``: embedded collector,
embedded store and the local agent, exactly what an operator starts.  The X
server is pytest-xvfb's when it provides ``DISPLAY``, otherwise a private
``Xvfb`` started here on a free display number and stopped by pid.
ARTIFACTS is ``$CLOUDMON_TEST_ARTIFACTS`` or ``<repo>/artifacts``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from cloudmon.ui.app import WINDOW_SIZE

pytestmark = [pytest.mark.gui, pytest.mark.xvfb_screenshot]

REPO = Path(__file__).resolve().parents[2]
X_SOCKETS = Path("/tmp/.X11-unix")


def artifacts_dir() -> Path:
    return Path(os.environ.get("CLOUDMON_TEST_ARTIFACTS") or REPO / "artifacts")


def _free_display() -> int:
    for n in range(90, 200):
        if not (X_SOCKETS / f"X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number between :90 and :199")


@contextmanager
def x_display() -> Iterator[str]:
    """A DISPLAY to run the app on: pytest-xvfb's, or a private Xvfb."""
    display = os.environ.get("DISPLAY")
    if display:
        yield display
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no X server: install Xvfb (apt-get install xvfb) or run under a display")
    n = _free_display()
    proc = subprocess.Popen(
        [xvfb, f":{n}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (X_SOCKETS / f"X{n}").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"Xvfb :{n} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Xvfb :{n} did not come up")
            time.sleep(0.05)
        yield f":{n}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def distinct_colours(image: QImage, step: int = 3) -> int:
    colours = set()
    for y in range(0, image.height(), step):
        for x in range(0, image.width(), step):
            colours.add(image.pixel(x, y))
    return len(colours)


def test_app_process_saves_overview_screenshot(tmp_path: Path) -> None:
    shot = artifacts_dir() / "overview.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        QT_QPA_PLATFORM="xcb",
        # Keep the user's config and data out of it.
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data-home"),
        XDG_STATE_HOME=str(tmp_path / "state-home"),
        CLOUDMON_LOG_LEVEL="INFO",
    )
    cmd = [
        sys.executable,
        "-m",
        "cloudmon",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--screenshot",
        str(shot),
    ]
    with x_display() as display:
        env["DISPLAY"] = display
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "first overview drawn after " in text, text
    image = QImage(str(shot))
    assert not image.isNull(), f"{shot} is not a readable PNG"
    assert (image.width(), image.height()) == WINDOW_SIZE
    # A real window with a table, text and colours, not a blank or black frame.
    assert distinct_colours(image) > 30
