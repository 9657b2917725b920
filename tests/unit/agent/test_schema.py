"""The wire schema accepts what the agent really sends and rejects bad reports naming the field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig
from cloudmon_agent.schema import SUPPORTED_VERSIONS, SchemaError, decode_report, encode, flatten


@pytest.fixture
def real_report(config: AgentConfig) -> dict[str, Any]:
    with Agent(config) as agent:
        agent.prime()
        sum(i for i in range(100_000))
        report = agent.sample()
    doc: dict[str, Any] = msgspec.json.decode(encode(report))
    return doc


def _enc(doc: dict[str, Any]) -> bytes:
    return msgspec.json.encode(doc)


def test_a_real_sampled_report_decodes(real_report: dict[str, Any]) -> None:
    report = decode_report(_enc(real_report))
    assert report.host.mem_total == real_report["host"]["mem_total"]
    names = flatten(report)
    assert {"cpu.percent", "mem.used", "fs./.percent", "agent.cpu_ms", "cpu.core.0"} <= set(names)


def test_cpu_percent_over_100_is_rejected_naming_the_field(real_report: dict[str, Any]) -> None:
    real_report["host"]["cpu_percent"] = 150
    with pytest.raises(SchemaError, match=r"\$\.host\.cpu_percent"):
        decode_report(_enc(real_report))


def test_missing_host_is_rejected_naming_it(real_report: dict[str, Any]) -> None:
    del real_report["host"]
    with pytest.raises(SchemaError, match="missing required field `host`"):
        decode_report(_enc(real_report))


def test_wrong_type_is_rejected_naming_the_field(real_report: dict[str, Any]) -> None:
    real_report["host"]["mem_total"] = "lots"
    with pytest.raises(SchemaError, match=r"Expected `int`, got `str` - at `\$\.host\.mem_total`"):
        decode_report(_enc(real_report))


def test_negative_rate_and_bad_node_id_are_rejected(real_report: dict[str, Any]) -> None:
    bad_rate = dict(real_report, host=dict(real_report["host"], net_rx_bps=-1.0))
    with pytest.raises(SchemaError, match="net_rx_bps"):
        decode_report(_enc(bad_rate))
    with pytest.raises(SchemaError, match="node_id"):
        decode_report(_enc(dict(real_report, node_id="has space")))


def test_unknown_version_names_the_supported_ones(real_report: dict[str, Any]) -> None:
    real_report["v"] = 99
    with pytest.raises(SchemaError) as err:
        decode_report(_enc(real_report))
    text = str(err.value)
    assert "v=99" in text
    assert all(str(v) in text for v in SUPPORTED_VERSIONS)


def test_malformed_json_is_rejected() -> None:
    with pytest.raises(SchemaError, match="malformed JSON"):
        decode_report(b'{"v": 1,')
