"""Entry point of the desktop console: :func:`run_console`.

``python -m cloudmon.ui.app --url URL --token TOKEN [--screenshot FILE]`` opens
the console on a running collector (handy while developing the UI); the
product command is ``cloudmon`` (:mod:`cloudmon.cli`), which calls
:func:`run_console` in embedded or remote mode.
"""

from __future__ import annotations

import time

_IMPORTED_AT = time.time()

import argparse  # noqa: E402 - the timestamp above must come first
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from cloudmon.ui.theme import apply_theme  # noqa: E402
from cloudmon.ui.window import MainWindow  # noqa: E402

logger = logging.getLogger(__name__)

#: Without a node after this long, a screenshot run saves what it has and fails.
SCREENSHOT_DEADLINE_MS = 60_000
WINDOW_SIZE = (1280, 800)


def seconds_since_start() -> float:
    """Seconds since this process started.

    On Linux both numbers come from the boot-relative clock in ``/proc``
    (10 ms resolution).  ``psutil.Process().create_time()`` adds the boot time
    from ``/proc/stat``, whole seconds and drifting: it was off by ≈ 0.8 s here.
    Elsewhere: psutil, then this module's import time.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Field 22 (starttime, clock ticks since boot); the command name in
            # field 2 may contain spaces, so count from its closing parenthesis.
            start_ticks = int(fh.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except (ImportError, OSError) as exc:
        logger.debug("process start time unavailable (%s); using import time", exc)
        return time.time() - _IMPORTED_AT


def _save_screenshot(window: MainWindow, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = window.grab().save(str(path), "PNG")
    if ok:
        logger.info("screenshot saved to %s", path)
    else:
        logger.error("could not write the screenshot to %s", path)
    return bool(ok)


class _SignalGuard:
    """Close the window on Ctrl+C / SIGTERM while the event loop runs.

    Python runs signal handlers only between bytecodes and Qt's event loop is
    C++, so a cheap timer gives the interpreter a chance to run them.  The
    previous handlers come back on :meth:`close`.
    """

    def __init__(self, window: MainWindow) -> None:
        self._old: dict[int, Any] = {}
        self._timer: QTimer | None = None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: object) -> None:
            logger.info("signal %s: closing the console", signum)
            window.close()

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, handler)
        self._timer = QTimer()
        self._timer.setInterval(250)
        self._timer.timeout.connect(lambda: None)
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def run_console(
    url: str,
    token: str | None,
    *,
    embedded: bool,
    on_close: Callable[[], None] | None = None,
    screenshot: Path | None = None,
    argv: list[str] | None = None,
    simulated: bool = False,
) -> int:
    """Show the console for the collector at ``url`` and run the event loop.

    ``on_close`` runs after the window has closed and every console thread has
    stopped (embedded mode shuts its collector and agent down there).  With
    ``screenshot``, the window is saved as a PNG as soon as the overview shows
    its first node, and the app exits with 0 (1 if saving failed, 3 if no node
    appeared within a minute).  ``simulated`` (``cloudmon demo``) labels the window
    a simulation and opens the Groups page.  Returns the exit code.
    """
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(argv or [sys.argv[0]])
    app.setApplicationName("cloudmon")
    app.setApplicationDisplayName("cloudmon")
    apply_theme(app)
    window = MainWindow(url, token, embedded=embedded, simulated=simulated)
    window.resize(*WINDOW_SIZE)
    exit_code: list[int] = []

    def finish(code: int) -> None:
        if not exit_code:
            exit_code.append(code)
        window.close()

    # Quit when *this* window closes, synchronously.  Qt's quit-on-last-window
    # posts a Quit event that can outlive exec() and then stops every later
    # event loop in this process (seen with a second console in the same test run).
    quit_on_last = app.quitOnLastWindowClosed()
    app.setQuitOnLastWindowClosed(False)
    window.closed.connect(lambda: app.exit(exit_code[0] if exit_code else 0))

    def on_first_draw() -> None:
        logger.info("first overview drawn after %.3f s", seconds_since_start())
        if screenshot is not None:
            # Let the freshly inserted rows be laid out and painted before grabbing.
            QTimer.singleShot(0, lambda: finish(0 if _save_screenshot(window, screenshot) else 1))

    window.first_overview_drawn.connect(on_first_draw)
    deadline: QTimer | None = None
    if screenshot is not None:

        def give_up() -> None:
            logger.error(
                "no node appeared within %.0f s; saving the window as it is", SCREENSHOT_DEADLINE_MS / 1000
            )
            _save_screenshot(window, screenshot)
            finish(3)

        deadline = QTimer()
        deadline.setSingleShot(True)
        deadline.timeout.connect(give_up)
        deadline.start(SCREENSHOT_DEADLINE_MS)
    guard = _SignalGuard(window)
    window.show()
    window.start()
    if simulated:
        window.open_groups()
    try:
        code = app.exec()
    finally:
        guard.close()
        if deadline is not None:
            deadline.stop()
        app.setQuitOnLastWindowClosed(quit_on_last)
        window.shutdown()
        window.deleteLater()
        if on_close is not None:
            on_close()
    return exit_code[0] if exit_code else code


def main(argv: list[str] | None = None) -> int:
    """Development runner: the console on an already running collector."""
    parser = argparse.ArgumentParser(prog="python -m cloudmon.ui.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="collector URL, e.g. http://127.0.0.1:8470")
    parser.add_argument("--token", help="bearer token of the collector")
    parser.add_argument("--screenshot", type=Path, help="save a PNG once the overview is drawn, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_console(args.url, args.token, embedded=False, screenshot=args.screenshot)


if __name__ == "__main__":
    sys.exit(main())
