"""Repository-level checks: CI runs the README's test command; linters pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_COMMAND = "bash packaging/install.sh --test && .venv/bin/python -m pytest"
RUN_COMMAND = "bash packaging/install.sh && .venv/bin/cloudmon"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in readme
    assert RUN_COMMAND in readme
    assert TEST_COMMAND in ci


def test_ruff_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _readme_block(after: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"```{lang}\n", text.index(after)) + len(lang) + 4
    return text[start : text.index("```", start)]


def test_the_readme_groups_file_applies(tmp_path: Path) -> None:
    from cloudmon.autoscale.apply import load_file

    path = tmp_path / "groups.toml"
    path.write_text(_readme_block("## Auto-scaling groups", "toml"), encoding="utf-8")
    (group,) = load_file(path)
    assert group.name == "web"
    assert [type(p).__name__ for p in group.policies] == ["TargetTrackingPolicy", "StepScalingPolicy"]
    assert group.scheduled[0].cron == "0 8 * * 1-5"


def test_the_readme_service_group_and_rule_are_valid() -> None:
    import json
    import re

    import msgspec

    from cloudmon.lb.service import ServiceGroup
    from cloudmon.rebalance.snapshot import Rule

    block = _readme_block("**Load balancers (ELB-like)**", "sh")
    body = json.loads(re.search(r"-d '(.*)'", block, re.S).group(1))  # type: ignore[union-attr]
    group = ServiceGroup.from_document({"name": "web", **body})
    assert group.members == {"web-1": "srv1", "web-2": "srv2"}
    rules = _readme_block("Placement rules and maintenance go through the API", "sh")
    rule = json.loads(re.search(r"rules/web-spread -d '(.*?)'", rules).group(1))  # type: ignore[union-attr]
    assert msgspec.convert({"name": "web-spread", **rule}, Rule).kind == "anti_affinity"
