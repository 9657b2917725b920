"""Startup refusals, port conflicts, the OpenAPI document, token hygiene and clean close."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from cloudmon.client import ApiClient
from cloudmon.collector import Collector, CollectorThread, ListenError
from cloudmon.config import Config, ConfigError
from cloudmon.store import TelemetryStore
from tests.unit.collector.conftest import StartCollector
from tests.unit.collector.helpers import TOKEN, FakeClock, get, post, report_json


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_non_loopback_without_token_is_refused(store: TelemetryStore, host: str) -> None:
    with pytest.raises(ConfigError) as err:
        Collector(Config(listen_host=host, listen_port=0), store, "")
    assert "CLOUDMON_TOKEN" in str(err.value)
    assert host in str(err.value)


def test_port_in_use_is_a_clear_error_and_leaves_nothing_running(
    store: TelemetryStore, no_thread_leaks: None
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ct = CollectorThread(Config(listen_port=port), store, TOKEN)
        with pytest.raises(ListenError) as err:
            ct.start()
        ct.close()
    assert isinstance(err.value, OSError)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "in use" in str(err.value)


def test_close_is_idempotent_and_joins_every_thread(
    start_collector: StartCollector, clock: FakeClock
) -> None:
    # start_collector's no_thread_leaks check runs after this test's own close.
    ct = start_collector()
    assert post(ct.url, report_json(ts=clock.now)).status == 200
    events = ApiClient(ct.url, TOKEN).stream("node-a")
    assert next(events).event == "nodes"
    ct.close()
    ct.close()
    assert all(e.event == "nodes" for e in events)  # the stream ended with the collector


def test_token_is_never_logged(
    start_collector: StartCollector, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ct = start_collector()
    post(ct.url, report_json(ts=clock.now))
    post(ct.url, report_json(ts=clock.now), token="guessed-token")
    ct.close()
    assert caplog.records, "expected some log output to check"
    assert TOKEN not in caplog.text
    assert "guessed-token" not in caplog.text


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_describes_every_route(collector: CollectorThread) -> None:
    answer = get(collector.url, "/api/v1/openapi.json")
    assert answer.status == 200
    doc = answer.body
    assert doc["openapi"].startswith("3.1")
    served = {(r.method, r.resource.canonical) for r in collector.collector.app.router.routes() if r.resource}
    assert len(served) >= 8
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], f"{method} {path} has no responses"
            if path.startswith("/api/v1/"):
                assert "401" in op["responses"], f"{method} {path} does not document 401"
    ingest = doc["paths"]["/api/v1/ingest"]["post"]
    assert {"400", "413", "415", "503"} <= set(ingest["responses"])
    series_params = {p["name"] for p in doc["paths"]["/api/v1/series"]["get"]["parameters"]}
    assert series_params == {"node", "metric", "start", "end", "step"}
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert get(collector.url, "/api/v1/openapi.json", token=None).status == 401
