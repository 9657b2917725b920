"""cloudmon-agent's main(): --once, usage errors, config errors (in-process), collector switches (real process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmon_agent import __version__
from cloudmon_agent.cli import main
from cloudmon_agent.collectors.vms import libvirt_available
from cloudmon_agent.schema import Report, decode_report


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text("")
    return p


def test_once_prints_one_valid_report(
    tmp_path: Path, empty_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--once", "--interval", "0.2", "--state-dir", str(tmp_path / "s"), "--name", "cli-node",
               "--config", str(empty_config)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert len(out.strip().splitlines()) == 1
    report = decode_report(out)
    assert report.node.hostname == "cli-node"
    assert report.interval == 0.2
    assert report.node_id == (tmp_path / "s" / "node-id").read_text().strip()


def test_without_collector_exits_2_saying_how_to_run_it(
    empty_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--config", str(empty_config)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cloudmon-agent --collector http://COLLECTOR:8470 --token TOKEN" in err
    assert "--once" in err


def test_bad_setting_exits_2_naming_it(empty_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", str(empty_config), "--collector", "http://x:1", "--interval", "fast"])
    assert rc == 2
    assert "interval (from --interval): expected a number, got 'fast'" in capsys.readouterr().err


def test_env_settings_are_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLOUDMON_NODE_ID", "env-node-1")
    monkeypatch.setenv("CLOUDMON_INTERVAL", "0.1")
    rc = main(["--once", "--config", str(empty_config), "--state-dir", str(tmp_path)])
    assert rc == 0
    report = decode_report(capsys.readouterr().out)
    assert (report.node_id, report.interval) == ("env-node-1", 0.1)


def test_version_and_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cloudmon-agent {__version__}"
    assert main(["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_spool_flags_are_checked(empty_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", str(empty_config), "--collector", "http://x:1", "--spool-max-bytes", "1k"])
    assert rc == 2
    assert "spool_max_bytes (from --spool-max-bytes): must be >= 65536 bytes" in capsys.readouterr().err
    rc = main(["--config", str(empty_config), "--collector", "http://x:1", "--retry-max", "never"])
    assert rc == 2
    assert "retry_max (from --retry-max): expected a number, got 'never'" in capsys.readouterr().err


def test_an_unusable_spool_directory_exits_2_naming_it(
    tmp_path: Path, empty_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool").write_text("a file where the spool directory belongs")
    rc = main(["--config", str(empty_config), "--collector", "http://127.0.0.1:1", "--node-id", "n1",
               "--state-dir", str(state)])  # fmt: skip
    assert rc == 2
    assert f"state_dir: spool directory {state / 'spool'}" in capsys.readouterr().err


def _agent_once(tmp_path: Path, *args: str) -> Report:
    """``cloudmon-agent --once ARGS`` as a real process, in a clean environment; its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDMON_") and k != "STATE_DIRECTORY"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")  # no user config file
    script = Path(sys.executable).with_name("cloudmon-agent")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cloudmon_agent"]
    result = subprocess.run(
        [*cmd, "--once", "--interval", "0.2", "--state-dir", str(tmp_path / "s"), *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return decode_report(result.stdout)


@pytest.mark.skipif(not libvirt_available(), reason="libvirt-python is not installed")
def test_libvirt_uri_flag_turns_vms_on_and_off_in_the_real_process(tmp_path: Path) -> None:
    on = _agent_once(tmp_path, "--libvirt-uri", "test:///default", "--top-n", "3", "--budget-ms", "0")
    # libvirt's default test host has one running domain called "test".
    assert [(vm.name, vm.state) for vm in on.vms] == [("test", "running")]
    assert on.processes is not None
    assert len(on.processes.by_cpu) <= 3
    assert on.budget is None  # --budget-ms 0: no budget section
    off = _agent_once(tmp_path, "--libvirt-uri", "", "--top-n", "0", "--no-containers", "--no-gpus")
    assert off.vms == []
    assert off.processes is None
    assert off.containers == []
    assert off.gpus == []
    assert off.node_id == on.node_id


def test_collector_switch_flags_are_checked(empty_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--once", "--top-n", "many", "--config", str(empty_config)]) == 2
    assert "top_n (from --top-n): expected a whole number" in capsys.readouterr().err
    assert main(["--once", "--libvirt-uri", "no uri", "--config", str(empty_config)]) == 2
    assert "libvirt_uri (from --libvirt-uri): must be a libvirt URI" in capsys.readouterr().err
