"""Embedded mode: collector + store + local agent in one process, as ``cloudmon`` starts them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmon.client import ApiClient
from cloudmon.config import Config
from cloudmon.runtime import EmbeddedRuntime, RuntimeStartError, running_collector_url

pytestmark = pytest.mark.integration


def _wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[EmbeddedRuntime]:
    before = set(threading.enumerate())
    rt = EmbeddedRuntime(Config(data_dir=str(tmp_path), listen_port=0))
    try:
        rt.start()
        yield rt
    finally:
        rt.close()
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == []


def test_local_agent_reports_to_the_embedded_collector(runtime: EmbeddedRuntime) -> None:
    assert runtime.url.startswith("http://127.0.0.1:")
    api = ApiClient(runtime.url, runtime.token)
    try:
        _wait_until(lambda: len(api.nodes().nodes) == 1)
        (node,) = api.nodes().nodes
        assert node.status == "online"
        assert node.hostname == socket.gethostname()
        assert 0.0 <= node.values["cpu.percent"] <= 100.0
    finally:
        api.close()


def test_second_console_on_the_same_data_dir_is_told_what_to_do(
    runtime: EmbeddedRuntime, tmp_path: Path
) -> None:
    second = EmbeddedRuntime(Config(data_dir=str(tmp_path), listen_port=0))
    with pytest.raises(RuntimeStartError, match=f"--connect {runtime.url}"):
        second.start()
    second.close()
    # The first one is unharmed.
    api = ApiClient(runtime.url, runtime.token)
    try:
        assert api.status()["loopback"] is True
    finally:
        api.close()


def test_default_port_taken_falls_back_to_a_free_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rt = EmbeddedRuntime(Config(data_dir=str(tmp_path), listen_port=port), local_agent=False)
        try:
            rt.start()
            assert rt.url.startswith("http://127.0.0.1:")
            assert not rt.url.endswith(f":{port}")
            api = ApiClient(rt.url, rt.token)
            try:
                assert api.nodes().nodes == []
            finally:
                api.close()
        finally:
            rt.close()


def test_history_survives_a_restart(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path), listen_port=0)
    rt = EmbeddedRuntime(config)
    try:
        rt.start()
        api = ApiClient(rt.url, rt.token)
        _wait_until(lambda: len(api.nodes().nodes) == 1 and api.nodes().nodes[0].values != {})
        node_id = api.nodes().nodes[0].node_id
        first_ts = api.nodes().nodes[0].last_ts
        api.close()
    finally:
        rt.close()
    rt = EmbeddedRuntime(config, local_agent=False)
    try:
        rt.start()
        api = ApiClient(rt.url, rt.token)
        try:
            series = api.series(node_id, ["cpu.percent"], start=first_ts - 60, end=time.time() + 1, step=1)
            points = [v for v in series.metrics["cpu.percent"].avg if v is not None]
            assert points, "the sample taken before the restart is gone"
            assert [n.node_id for n in api.nodes().nodes] == [node_id]
        finally:
            api.close()
    finally:
        rt.close()


def test_other_commands_find_the_running_console_and_only_while_it_runs(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path), listen_port=0)
    assert running_collector_url(config) is None
    rt = EmbeddedRuntime(config, local_agent=False)
    try:
        rt.start()
        assert running_collector_url(config) == rt.url
    finally:
        rt.close()
    # The file stays behind, but nobody holds it: it is not believed.
    assert (tmp_path / "cloudmon.lock").exists()
    assert running_collector_url(config) is None
