"""CommandProvider running a real small program (a Python script written in the test's tmp dir)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cloudmon.providers import InstanceState, LaunchRequest, ProviderError, open_provider
from cloudmon.providers.command import STDERR_CHARS, CommandProvider

# A tiny "cloud": instances are files in a state directory.  Behaviour switches
# come from the request's params (create) or from files (delete/describe).
CLOUD = r"""
import json, os, sys, time
state = sys.argv[1]
req = json.load(sys.stdin)
os.makedirs(state, exist_ok=True)
with open(os.path.join(state, "log"), "a") as f:
    f.write(json.dumps(req) + "\n")
if req["action"] == "create":
    p = req["params"]
    if p.get("fail"):
        sys.stderr.write("quota exceeded for " + req["name"] + "\n" + "x" * p.get("noise", 0))
        sys.exit(3)
    if p.get("hang"):
        # a child that would keep stdout open forever: the group kill must take it too
        pid = os.fork()
        with open(os.path.join(state, "pids"), "a") as f:
            f.write(f"{os.getpid()} {pid if pid else os.getpid()}\n")
        time.sleep(600)
    iid = "i-" + req["name"]
    with open(os.path.join(state, iid), "w") as f:
        f.write(req["group"])
    if p.get("json"):
        print(json.dumps({"id": iid, "host": "zone-a", "node_id": "node-" + iid, "state": "pending"}))
    elif p.get("noid"):
        pass
    else:
        print(iid)
elif req["action"] == "delete":
    path = os.path.join(state, req["id"])
    if os.path.exists(path):
        os.unlink(path)
elif req["action"] == "describe":
    out = {}
    for i in req["ids"]:
        path = os.path.join(state, i)
        if os.path.exists(path):
            out[i] = {"state": "running", "host": "zone-a", "group": open(path).read()}
    print(json.dumps(out))
"""


@pytest.fixture
def cloud(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "cloud.py"
    script.write_text(CLOUD, encoding="utf-8")
    state = tmp_path / "state"
    return [sys.executable, str(script), str(state)], state


def _provider(argv: list[str], describe: bool = True, **extra: Any) -> CommandProvider:
    opts: dict[str, Any] = {"create": [*argv], "delete": [*argv], "timeout_s": 20, **extra}
    if describe:
        opts["describe"] = [*argv]
    return CommandProvider(opts)


def _req(name: str, **params: Any) -> LaunchRequest:
    return LaunchRequest(group="web", name=name, vcpus=2, memory_mib=2048, image="img-1", params=params)


def test_create_describe_delete_through_the_program(cloud: tuple[list[str], Path]) -> None:
    argv, state = cloud
    p = open_provider("command", {"create": argv, "delete": argv, "describe": argv})
    try:
        info = p.create(_req("a"))
        assert (info.id, info.group, info.state) == ("i-a", "web", InstanceState.RUNNING)
        sent = json.loads((state / "log").read_text().splitlines()[0])
        assert sent == {
            "action": "create",
            "group": "web",
            "name": "a",
            "vcpus": 2,
            "memory_mib": 2048,
            "image": "img-1",
            "host": None,
            "params": {},
        }
        desc = p.describe(["i-a", "i-zz"])
        assert (desc["i-a"].state, desc["i-a"].host, desc["i-a"].group) == (
            InstanceState.RUNNING,
            "zone-a",
            "web",
        )
        assert desc["i-zz"].state is InstanceState.MISSING
        p.delete("i-a")
        assert not (state / "i-a").exists()
        p.delete("i-a")
        assert p.describe(["i-a"])["i-a"].state is InstanceState.MISSING
    finally:
        p.close()


def test_create_may_answer_json(cloud: tuple[list[str], Path]) -> None:
    p = _provider(cloud[0])
    info = p.create(_req("b", json=True))
    assert (info.id, info.host, info.node_id, info.state) == (
        "i-b",
        "zone-a",
        "node-i-b",
        InstanceState.PENDING,
    )


def test_without_describe_created_instances_count_as_running(cloud: tuple[list[str], Path]) -> None:
    p = _provider(cloud[0], describe=False)
    p.create(_req("c"))
    assert p.describe(["i-c"])["i-c"].state is InstanceState.RUNNING
    p.delete("i-c")
    assert p.describe(["i-c"])["i-c"].state is InstanceState.MISSING


def test_a_failing_program_shows_exit_code_and_stderr(cloud: tuple[list[str], Path]) -> None:
    p = _provider(cloud[0])
    with pytest.raises(ProviderError, match=r"create program .* exited with 3; stderr: quota exceeded for d"):
        p.create(_req("d", fail=True))


def test_long_stderr_is_truncated_to_its_end(cloud: tuple[list[str], Path]) -> None:
    p = _provider(cloud[0])
    with pytest.raises(ProviderError) as exc:
        p.create(_req("e", fail=True, noise=50_000))
    text = str(exc.value)
    assert len(text) < STDERR_CHARS + 500
    assert text.endswith("x" * 100)
    assert "stderr: ..." in text


def test_no_id_on_stdout_is_an_error(cloud: tuple[list[str], Path]) -> None:
    with pytest.raises(ProviderError, match="printed no instance id"):
        _provider(cloud[0]).create(_req("f", noid=True))


def test_a_hanging_program_is_killed_with_its_children(cloud: tuple[list[str], Path]) -> None:
    argv, state = cloud
    p = _provider(argv, timeout_s=1.0)
    with pytest.raises(ProviderError, match=r"did not finish within 1 s \(its process group was killed\)"):
        p.create(_req("g", hang=True))
    pids = {int(x) for line in (state / "pids").read_text().split("\n") if line for x in line.split()}
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in pids if _alive(pid)}
        time.sleep(0.05)
    assert alive == set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of an exited parent is reaped by init; a zombie is not running
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_a_missing_program_says_which(tmp_path: Path) -> None:
    p = CommandProvider({"create": [str(tmp_path / "nope")], "delete": "true"})
    with pytest.raises(ProviderError, match=r"cannot run the create program .*nope"):
        p.create(_req("h"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delete": "true"}, "needs a create program"),
        ({"create": "true"}, "needs a delete program"),
        ({"create": "true", "delete": 3}, "must be a list of strings or a string"),
        ({"create": "true", "delete": "true", "timeout_s": 0}, "timeout_s must be > 0"),
        ({"create": "true", "delete": "true", "env": ["A"]}, "env must be a table"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ProviderError, match=message):
        CommandProvider(options)


def test_env_and_string_argv(tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text('#!/bin/sh\ncat >/dev/null\necho "i-$REGION"\n', encoding="utf-8")
    script.chmod(0o755)
    p = CommandProvider(
        {"create": f"{script}", "delete": "true", "env": {"REGION": "eu1"}, "cwd": str(tmp_path)}
    )
    assert p.create(_req("i")).id == "i-eu1"
    assert p.hosts() == {}
    p.close()
    with pytest.raises(ProviderError, match="closed"):
        p.create(_req("j"))
