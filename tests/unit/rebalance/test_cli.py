"""``cloudmon plan``: readable and JSON output, options override the snapshot's settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmon.rebalance.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "resources" / "examples" / "snapshot.json"


def test_text_plan_of_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--snapshot", str(EXAMPLE), "--solver", "heuristic"]) == 0
    out = capsys.readouterr().out
    assert "Imbalance" in out
    assert "Moves:" in out
    assert "kvm-c" in out
    assert "mandatory" in out


def test_json_plan_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--snapshot", str(EXAMPLE), "--solver", "heuristic", "--threshold", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["threshold"] == 1
    assert {m["vm"] for m in doc["moves"]} >= {"batch-1", "batch-2"}
    assert all(m["mandatory"] for m in doc["moves"])


def test_bad_snapshot_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"ts": 1, "hosts": [], "vms": [{"name": "v", "host": "x", "cpu_demand_cores": 1, "memory_mib": 1}]}'
    )
    assert main(["--snapshot", str(bad)]) == 2
    assert "VM 'v' runs on host 'x'" in capsys.readouterr().err


def test_runs_as_a_process_and_touches_nothing(tmp_path: Path) -> None:
    before = EXAMPLE.read_bytes()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudmon.rebalance.cli",
            "--snapshot",
            str(EXAMPLE),
            "--mode",
            "consolidate",
            "--solver",
            "heuristic",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "consolidate" in result.stdout
    assert EXAMPLE.read_bytes() == before
    assert list(tmp_path.iterdir()) == []
