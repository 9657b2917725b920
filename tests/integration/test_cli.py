"""The ``cloudmon`` command as a user runs it (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import StartCollectorProcess

pytestmark = pytest.mark.integration


def _cloudmon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cloudmon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        check=False,
    )


def test_headless_collector_off_loopback_needs_a_configured_token(tmp_path: Path) -> None:
    result = _cloudmon("collector", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "requires a configured token" in result.stderr
    assert "CLOUDMON_TOKEN" in result.stderr
    assert not (tmp_path / "telemetry.db").exists()


def test_print_config_hides_the_token(tmp_path: Path) -> None:
    result = _cloudmon(
        "--print-config", "--data-dir", str(tmp_path), env={"CLOUDMON_TOKEN": "s3cret-value"}
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["token"] == "***"
    assert shown["data_dir"] == str(tmp_path)
    assert "s3cret-value" not in result.stdout + result.stderr


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = _cloudmon("collector", "--data-dir", str(tmp_path), env={"CLOUDMON_NODE_TIMEOUT": "soon"})
    assert result.returncode == 2
    assert "node_timeout" in result.stderr


GROUPS_TOML = """
[[group]]
name = "web"
min_size = 1
max_size = 3
desired = 1
[group.template]
provider = "command"
[group.template.params]
create = ["/bin/sh", "-c", "cat >/dev/null; echo i-$$"]
delete = ["/bin/sh", "-c", "cat >/dev/null"]
[[group.policies]]
type = "target_tracking"
name = "cpu"
metric = "cpu.percent"
target = 60
"""


def test_apply_creates_then_leaves_unchanged_and_names_bad_fields(
    tmp_path: Path, start_collector_process: StartCollectorProcess
) -> None:
    collector = start_collector_process()
    groups = tmp_path / "groups.toml"
    groups.write_text(GROUPS_TOML, encoding="utf-8")
    connect = ("--connect", collector.url, "--token", collector.token)
    first = _cloudmon("apply", str(groups), *connect)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["created web"]
    again = _cloudmon("apply", str(groups), *connect)
    assert again.stdout.splitlines() == ["unchanged web"]
    changed = tmp_path / "changed.toml"
    changed.write_text(GROUPS_TOML.replace("max_size = 3", "max_size = 5"), encoding="utf-8")
    dry = _cloudmon("apply", str(changed), "--dry-run", *connect)
    assert dry.stdout.splitlines() == ["would be updated web"]
    bad = tmp_path / "bad.toml"
    bad.write_text(GROUPS_TOML.replace("desired = 1", "desired = 7"), encoding="utf-8")
    refused = _cloudmon("apply", str(bad), *connect)
    assert refused.returncode == 2
    assert "bad.toml" in refused.stderr
    assert "desired" in refused.stderr
    # Nothing running locally and no --connect: it says what to do.
    alone = _cloudmon("apply", str(groups), "--data-dir", str(tmp_path / "nobody"))
    assert alone.returncode == 2
    assert "start 'cloudmon' first" in alone.stderr


def test_plan_from_a_snapshot_is_what_if_and_readable(tmp_path: Path) -> None:
    snapshot = Path(__file__).resolve().parents[2] / "resources" / "examples" / "snapshot.json"
    before = snapshot.read_bytes()
    text = _cloudmon("plan", "--snapshot", str(snapshot), "--solver", "heuristic")
    assert text.returncode == 0, text.stderr
    assert "Imbalance" in text.stdout
    assert "Considered and rejected" in text.stdout
    as_json = _cloudmon("plan", "--snapshot", str(snapshot), "--solver", "heuristic", "--json")
    plan = json.loads(as_json.stdout)
    assert plan["moves"]
    assert plan["imbalance_after"] < plan["imbalance_before"]
    assert snapshot.read_bytes() == before
    missing = _cloudmon("plan", "--snapshot", str(tmp_path / "none.json"))
    assert missing.returncode == 2
    assert "none.json" in missing.stderr


def test_demo_runs_headless_and_its_group_launches_simulated_instances(tmp_path: Path) -> None:
    result = _cloudmon("demo", "--headless", "--seconds", "8", "--log-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "simulated cluster" in result.stdout
    assert "autoscale.group_put: group demo-web created" in result.stdout
    assert result.stdout.count("autoscale.launch:") >= 2
