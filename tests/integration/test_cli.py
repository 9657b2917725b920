"""The ``cloudmon`` command as a user runs it (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
