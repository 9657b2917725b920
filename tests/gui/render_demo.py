"""Run ``cloudmon demo``'s real stack and save what its console shows, to look at it.

    python -m tests.gui.render_demo [--minutes M] [OUTDIR]   (default: 3 min, <repo>/artifacts/demo)

The same pieces as ``cloudmon demo``: an embedded runtime (collector, store,
control loops) in a temp dir, the simulated cluster reporting over HTTP, the
demo group; then the real main window.  After ``--minutes`` it saves the
Overview, a host's VMs tab, the Groups page (the group's activity) and the Balance page, then
clicks **Compute plan** and **Approve and run** as an operator would and saves
the page again when the plan has run.  Offscreen unless ``QT_QPA_PLATFORM``
says otherwise.  Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication

from cloudmon.config import Config
from cloudmon.runtime import EmbeddedRuntime
from cloudmon.sim.demo import build_demo
from cloudmon.ui.nodepage import NodePage
from cloudmon.ui.theme import apply_theme
from cloudmon.ui.window import MainWindow
from tests.gui.render_screenshots import settle, wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument(
        "outdir", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "artifacts/demo"
    )
    args = parser.parse_args(argv)
    out: Path = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication(sys.argv[:1])
    apply_theme(app)
    with tempfile.TemporaryDirectory(prefix="cloudmon-demo-shot-") as tmp:
        runtime = EmbeddedRuntime(Config(data_dir=tmp, listen_port=0, control_tick_s=1.0), local_agent=False)
        runtime.start()
        demo = build_demo(runtime.url, runtime.token)
        window = MainWindow(runtime.url, runtime.token, embedded=True, simulated=True)
        try:
            runtime.control.add_provider("simulated", demo.provider)
            runtime.control.autoscale.put_group(demo.group)
            demo.start()
            window.resize(1400, 860)
            window.show()
            window.start()
            settle(app, 5)
            window.grab().save(str(out / "demo-overview.png"))
            save_vm_host(app, window, out / "demo-node-vms.png")
            groups = window.open_groups()
            end = time.monotonic() + args.minutes * 60
            while time.monotonic() < end:
                settle(app, 5)
                print(f"{(end - time.monotonic()) / 60:.1f} min to go", flush=True)
            window.grab().save(str(out / "demo-groups.png"))
            print("groups:", len(groups.groups), "group(s)", flush=True)
            balance = window.open_balance()
            settle(app, 4)
            window.grab().save(str(out / "demo-balance.png"))
            balance.compute_button.click()
            # As an operator: wait until the plan is shown and Approve can be clicked.
            wait(app, lambda: balance.approve_button.isEnabled() and balance.compute_button.isEnabled(), 60)
            settle(app, 1)
            window.grab().save(str(out / "demo-plan.png"))
            if balance.plan and balance.plan.get("moves"):
                balance.approve_button.click()
                wait(app, lambda: (balance.plan or {}).get("status") in ("done", "failed"), 120)
                settle(app, 3)
                window.grab().save(str(out / "demo-plan-done.png"))
                print("plan:", (balance.plan or {}).get("status"), flush=True)
        finally:
            window.shutdown()
            demo.close()
            runtime.close()
    print(f"saved in {out}")
    return 0


def save_vm_host(app: QApplication, window: MainWindow, path: Path) -> None:
    """The VMs tab of the first simulated host that reports VMs."""
    for node in window.overview.model.nodes():
        page = window.open_node(node.node_id)

        def has_vms(p: NodePage = page) -> bool:
            return p.vm_table.table.rowCount() > 0

        try:
            wait(app, has_vms, 5)
        except TimeoutError:
            window._close_page(page)
            continue
        page.sections.setCurrentWidget(page.vm_table)
        settle(app, 1)
        window.grab().save(str(path))
        window._close_page(page)
        return
    print("no simulated host reported VMs", flush=True)


if __name__ == "__main__":
    sys.exit(main())
