"""The agent's lite wire (standard library only) against msgspec: same JSON out, same messages accepted.

The agent command binds :mod:`cloudmon_agent.wire` to :mod:`cloudmon_agent._lite`;
this process (like the collector) has msgspec.  So the real schema is run
under the lite backend in a child process, fed the same cases as msgspec here,
and the answers compared: every case must be accepted by both or refused by
both, and what is accepted must come out as the same values and bytes.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from cloudmon_agent import _lite, schema
from cloudmon_agent.schema import Report, decode_report, encode

ROOT = Path(__file__).resolve().parents[3]

#: Runs in a child: reads [[type name, value], ...] and answers, per case, the
#: lite backend's ["ok", re-encoded JSON] or ["error", text].
LITE_CHILD = r"""
import json, sys
import cloudmon_agent
cloudmon_agent.WIRE = "lite"
from cloudmon_agent import schema, wire
assert wire.BACKEND == "lite" and "msgspec" not in sys.modules, "the lite backend loaded msgspec"
out = []
for name, value in json.load(sys.stdin):
    try:
        obj = wire.convert(value, getattr(schema, name))
    except wire.ValidationError as exc:
        out.append(["error", str(exc)])
    else:
        out.append(["ok", wire.encode(obj).decode()])
json.dump(out, sys.stdout)
"""


def run_lite(cases: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "agents"), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", LITE_CHILD],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [(a, b) for a, b in json.loads(proc.stdout)]


def run_msgspec(name: str, value: Any) -> tuple[str, str]:
    try:
        obj = msgspec.convert(value, getattr(schema, name))
    except msgspec.ValidationError as exc:
        return "error", str(exc)
    return "ok", encode(obj).decode()


def a_report() -> dict[str, Any]:
    """A full report with every section filled, as JSON-like builtins."""
    host = {
        "cpu_percent": 12.5, "cpu_per_core": [10.0, 15.0], "mem_total": 8 << 30, "mem_used": 3 << 30,
        "mem_available": 5 << 30, "mem_percent": 37.5, "swap_total": 0, "swap_used": 0, "swap_percent": 0.0,
        "disk_read_bps": 1.5, "disk_write_bps": 2.0, "disk_read_iops": 0.0, "disk_write_iops": 3.0,
        "net_rx_bps": 100.0, "net_tx_bps": 50.0, "net_rx_pps": 1.0, "net_tx_pps": 1.0,
        "load1": 0.5, "load5": 0.25, "load15": 0.125,
        "filesystems": [{"mount": "/", "fstype": "ext4", "total": 100, "used": 40, "percent": 40.0}],
        "uptime_s": 1234.5,
        "disks": [{"name": "vda", "read_bps": 1.0, "write_bps": 2.0, "read_iops": 3.0, "write_iops": 4.0,
                   "busy_percent": 5.0}],
        "nics": [{"name": "eth0", "rx_bps": 1.0, "tx_bps": 2.0, "rx_pps": 3.0, "tx_pps": 4.0,
                  "rx_errors_ps": 0.0, "tx_errors_ps": 0.0, "rx_drops_ps": 0.5, "tx_drops_ps": 0.0}],
        "pressure": [{"resource": "cpu", "some_avg10": 1.0, "some_percent": 2.0, "full_avg10": None,
                      "full_percent": None}],
        "sensors": [{"chip": "coretemp", "label": "Package id 0", "kind": "temp", "value": 45.0}],
    }  # fmt: skip
    return {
        "v": 1, "node_id": "node-1", "ts": 1_700_000_000.25, "seq": 7, "interval": 1.0,
        "node": {"hostname": "h", "os": "Linux", "cpu_count": 2, "agent_version": "0.1.0", "migrate_uri": ""},
        "host": host,
        "agent": {"cpu_ms": 0.8, "rss_bytes": 15 << 20, "dropped_reports": 0, "spooled": 3, "spool_bytes": 900,
                  "spool_dropped": 0},
        "processes": {"age_s": 2.0, "count": 100,
                      "by_cpu": [{"pid": 1, "name": "init", "cpu_percent": 1.0, "rss_bytes": 1000}],
                      "by_mem": []},
        "vms": [{"uuid": "u-1", "name": "vm1", "state": "running", "vcpus": 2, "cpu_percent": 50.0,
                 "host_cpu_percent": 50.0, "mem_max": 1 << 30, "mem_current": 1 << 30, "mem_rss": 5 << 20,
                 "mem_unused": None,
                 "disks": [{"device": "vda", "read_bps": 1.0, "write_bps": 0.0, "read_iops": 0.0,
                            "write_iops": 0.0}],
                 "nics": [{"name": "vnet0", "rx_bps": 1.0, "tx_bps": 2.0, "rx_pps": 0.0, "tx_pps": 0.0}],
                 "hostdevs": ["0000:65:00.0"]}],
        "containers": [{"name": "web", "kind": "docker", "cpu_percent": 3.0, "mem_bytes": 1 << 20,
                        "mem_limit": None, "io_read_bps": 0.0, "io_write_bps": 1.0}],
        "gpus": [{"index": 0, "pci": "0000:65:00.0", "name": "NVIDIA H100 80GB HBM3", "util_percent": 99.0,
                  "mem_used": 1, "mem_total": 2, "temp_c": 62.0, "power_w": 695.5,
                  "processes": [{"pid": 527, "mem_bytes": 1453326336}], "vm": None}],
        "budget": {"budget_ms": 1.0, "expected_ms": 0.9,
                   "throttled": [{"collector": "processes", "period": 16, "cost_ms": 4.0}]},
        "progress": [{"id": "c1", "state": "running", "detail": {"data_processed": 10}}],
        "results": [{"id": "c0", "ok": True, "started": 1.0, "finished": 2.0, "error": None, "detail": {}}],
    }  # fmt: skip


def params_cases() -> list[tuple[str, Any]]:
    """Valid and invalid parameters of every action, and answers with commands."""
    good = {
        "CreateParams": {"name": "web-1", "vcpus": 2, "memory_mib": 1024, "base_image": "/var/lib/img.qcow2",
                         "overlay_dir": "/var/lib/ov", "group": "web", "start": False, "domain_type": "qemu"},
        "StopParams": {"vm": "web-1", "timeout_s": 30.0, "force": False},
        "VmRef": {"vm": "web-1"},
        "MigrateParams": {"vm": "web-1", "dest_uri": "qemu+tcp://10.0.0.7/system", "live": True,
                          "timeout_s": 600, "bandwidth_mib": 100, "data_uri": None},
        "IngestResponse": {"accepted": 1, "acked": ["c0"],
                           "commands": [{"id": "c1", "action": "vm.stop", "deadline": 1.5, "timeout_s": 60,
                                         "params": {"vm": "a"}}]},
        "Command": {"id": "c.1:x", "action": "vm.create", "deadline": 2, "timeout_s": 0},
    }  # fmt: skip
    cases: list[tuple[str, Any]] = [(name, value) for name, value in good.items()]
    cases += [
        ("IngestResponse", {"accepted": 3}),
        ("CreateParams", {"name": "x", "vcpus": 0}),
        ("CreateParams", {"name": "x", "vcpus": 1025}),
        ("CreateParams", {"name": "x", "memory_mib": 15}),
        ("CreateParams", {"name": "", "vcpus": 1}),
        ("CreateParams", {"name": "x", "vcpus": True}),
        ("CreateParams", {"name": "x", "vcpus": 1.0}),
        ("CreateParams", {"name": "x", "rm_rf": "/"}),
        ("CreateParams", {"vcpus": 1}),
        ("CreateParams", ["x"]),
        ("CreateParams", {"name": "x" * 256}),
        ("CreateParams", {"name": "x", "cmdline": "c" * 4097}),
        ("StopParams", {"vm": "a", "timeout_s": 0}),
        ("StopParams", {"vm": "a", "timeout_s": 86400.5}),
        ("StopParams", {"vm": "a", "force": "yes"}),
        ("StopParams", {"vm": "a", "timeout_s": None}),
        ("MigrateParams", {"vm": "a", "dest_uri": ""}),
        ("MigrateParams", {"vm": "a", "dest_uri": "u", "bandwidth_mib": 0}),
        ("MigrateParams", {"vm": "a", "dest_uri": "u", "timeout_s": None}),
        ("VmRef", {"vm": None}),
        ("VmRef", {}),
        ("Command", {"id": "bad id!", "action": "vm.stop", "deadline": 1, "timeout_s": 1}),
        ("Command", {"id": "c", "action": "", "deadline": 1, "timeout_s": 1}),
        ("Command", {"id": "c", "action": "vm.stop", "deadline": "soon", "timeout_s": 1}),
        ("Command", {"id": "c", "action": "vm.stop", "deadline": 1, "timeout_s": -1}),
        ("Command", {"id": "c", "action": "vm.stop", "deadline": 1, "timeout_s": 1, "params": []}),
        ("IngestResponse", {"accepted": "1"}),
        ("IngestResponse", {"accepted": 1, "acked": [1]}),
        ("IngestResponse", {"accepted": 1, "commands": [{"id": "c"}]}),
        ("IngestResponse", {"accepted": 1, "acked": None}),
        ("IngestResponse", None),
    ]
    return cases


def mutated_reports(n: int, seed: int = 3) -> list[tuple[str, Any]]:
    """The full report with one value somewhere replaced by something else (often invalid)."""
    rng = random.Random(seed)
    replacements: list[Any] = [None, -1, -0.5, 0, 1, 1.5, 1e300, True, "", "x", "x" * 300, [], {}, [1], {"a": 1},
                               101.0, 2**63, "/", "node id"]  # fmt: skip
    out: list[tuple[str, Any]] = []
    for _ in range(n):
        doc = a_report()
        node: Any = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            child = node[key]
            if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
                node = child
                continue
            if isinstance(node, dict) and rng.random() < 0.1:
                del node[key]
            else:
                node[key] = copy.deepcopy(rng.choice(replacements))
            break
        out.append(("Report", doc))
    return out


def test_lite_accepts_and_refuses_exactly_what_msgspec_does() -> None:
    cases = [("Report", a_report()), *params_cases(), *mutated_reports(400)]
    lite = run_lite(cases)
    assert len(lite) == len(cases)
    refused = 0
    for (name, value), (lite_kind, lite_out) in zip(cases, lite, strict=True):
        ms_kind, ms_out = run_msgspec(name, value)
        assert lite_kind == ms_kind, (
            f"{name} {json.dumps(value)[:400]}: lite {lite_out!r}, msgspec {ms_out!r}"
        )
        if ms_kind == "ok":
            # The same values on the wire (floats may differ in spelling: 1e+18 vs 1e18).
            assert json.loads(lite_out) == json.loads(ms_out), name
        refused += ms_kind == "error"
    # The cases must exercise both sides, or the comparison proves little.
    assert refused >= 100
    assert len(cases) - refused >= 20


def test_lite_error_texts_name_the_field_like_msgspec() -> None:
    cases = [
        ("CreateParams", {"name": "x", "vcpus": 0}),
        ("CreateParams", {"name": "x", "rm_rf": "/"}),
        ("IngestResponse", {"accepted": 1, "commands": [{"id": "c", "action": "a", "deadline": "x",
                                                        "timeout_s": 1}]}),
        ("VmRef", {}),
    ]  # fmt: skip
    lite = run_lite(cases)
    assert lite[0] == ("error", "Expected `int` >= 1 - at `$.vcpus`")
    assert lite[1] == ("error", "Object contains unknown field `rm_rf`")
    assert lite[2] == ("error", "Expected `float`, got `str` - at `$.commands[0].deadline`")
    assert lite[3] == ("error", "Object missing required field `vm`")
    for (name, value), (_, text) in zip(cases, lite, strict=True):
        assert text == run_msgspec(name, value)[1]


@pytest.mark.parametrize("wire", ["", "msgspec"])
def test_a_real_agent_report_is_valid_for_the_collector(tmp_path: Path, wire: str) -> None:
    """``cloudmon-agent --once`` prints what decode_report (msgspec) accepts: lite (the default) or msgspec."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "agents"), CLOUDMON_AGENT_WIRE=wire)
    probe = (
        "import sys; from cloudmon_agent.cli import main; rc = main(sys.argv[1:]); "
        f"assert ('msgspec' in sys.modules) == {bool(wire)}, 'msgspec loaded: ' + str('msgspec' in sys.modules); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, "--once", "--interval", "0.2", "--state-dir", str(tmp_path),
         "--libvirt-uri", "", "--node-id", "lite-node"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = decode_report(proc.stdout)
    assert report.node_id == "lite-node"
    assert report.host.mem_total > 0
    assert report.agent.rss_bytes > 0


def test_unknown_wire_choice_is_refused_naming_the_values(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "agents"), CLOUDMON_AGENT_WIRE="fast")
    proc = subprocess.run(
        [sys.executable, "-m", "cloudmon_agent", "--once", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "CLOUDMON_AGENT_WIRE must be lite or msgspec, got 'fast'" in proc.stderr


# -- the lite Struct itself (in this process: _lite is importable beside msgspec) ---------------


class Inner(_lite.Struct, frozen=True):
    a: int
    b: list[int] = []


class Outer(_lite.Struct, frozen=True, kw_only=True):
    x: float = 1.0
    inner: Inner
    tags: dict[str, str] = {}
    made: str = _lite.field(default_factory=lambda: "made")
    gone: list[str] | _lite.UnsetType = _lite.UNSET


class Sparse(_lite.Struct, omit_defaults=True):
    id: str
    event: str = "taken"
    extra: int = 0


class Checked(_lite.Struct):
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")
        _lite.force_setattr(self, "n", self.n * 2)


def test_struct_defaults_are_fresh_per_instance_and_fields_keep_their_order() -> None:
    one, two = Inner(1), Inner(2)
    one.b.append(5)
    assert two.b == []
    assert Outer.__struct_fields__ == ("x", "inner", "tags", "made", "gone")
    o = Outer(inner=one)
    assert (o.x, o.made, o.tags) == (1.0, "made", {})
    with pytest.raises(TypeError):
        Outer(2.0, one)  # type: ignore[call-arg]  # keyword-only


def test_struct_encoding_leaves_out_unset_and_omitted_defaults() -> None:
    o = Outer(inner=Inner(1, [2]))
    assert _lite.encode(o) == b'{"x":1.0,"inner":{"a":1,"b":[2]},"tags":{},"made":"made"}'
    o2 = Outer(inner=Inner(1), gone=["g"])
    assert json.loads(_lite.encode(o2))["gone"] == ["g"]
    assert _lite.encode(Sparse("i")) == b'{"id":"i"}'
    assert _lite.encode(Sparse("i", "result", 3)) == b'{"id":"i","event":"result","extra":3}'
    assert _lite.to_builtins([o2]) == [json.loads(_lite.encode(o2))]


class Key(_lite.Struct, frozen=True):
    a: int
    b: str = ""


def test_struct_equality_hash_replace_and_post_init() -> None:
    assert Inner(1, [2]) == Inner(1, [2])
    assert Inner(1) != Inner(2)
    assert len({Key(1, "x"), Key(1, "x"), Key(2)}) == 2  # frozen: hashable by value
    with pytest.raises(TypeError):
        hash(Sparse("a"))  # not frozen: unhashable, as in msgspec
    r = _lite.replace(Sparse("a"), extra=4)
    assert (r.id, r.extra) == ("a", 4)
    assert _lite.asdict(r) == {"id": "a", "event": "taken", "extra": 4}
    assert Checked(3).n == 6
    with pytest.raises(ValueError, match="n must be >= 0"):
        Checked(-1)


def test_required_field_after_optional_is_refused_like_msgspec() -> None:
    with pytest.raises(TypeError, match="Required field 'b' cannot follow optional fields"):

        class Bad(_lite.Struct):
            a: int = 0
            b: int  # type: ignore[misc]  # the mistake under test


def test_decode_reports_malformed_json_as_decode_error() -> None:
    with pytest.raises(_lite.DecodeError, match="JSON is malformed"):
        _lite.decode(b"{nope")
    with pytest.raises(_lite.DecodeError):
        _lite.decode(b"\xff\xfe")
    assert _lite.decode(b'{"a": 1, "b": [2]}', type=Inner) == Inner(1, [2])
    with pytest.raises(_lite.ValidationError, match=r"Expected `int`, got `str` - at `\$.b\[1\]`"):
        _lite.decode(b'{"a": 1, "b": [2, "3"]}', type=Inner)


def test_full_report_round_trips_through_lite_to_the_same_bytes() -> None:
    doc = a_report()
    report = msgspec.convert(doc, Report)
    ((kind, out),) = run_lite([("Report", doc)])
    assert kind == "ok"
    assert out.encode() == encode(report)
    assert decode_report(out) == report


class Part(_lite.Struct, frozen=True):
    __lite_cache__: ClassVar[bool] = True
    name: str
    value: float
    inner: list[Key] = []


class Whole(_lite.Struct, frozen=True):
    seq: int
    parts: list[Part] = []


class CachedKey(_lite.Struct, frozen=True):
    __lite_cache__: ClassVar[bool] = True
    a: int


def test_cached_sections_encode_exactly_as_fresh_ones_and_follow_changes() -> None:
    parts = [Part("a", 1.5, [Key(1, "x")]), Part("b", 2.25)]
    first = _lite.encode(Whole(1, parts))
    assert json.loads(first) == _lite.to_builtins(Whole(1, parts))
    # The same part objects in the next report: their JSON is reused, the result is the same.
    assert _lite.encode(Whole(2, parts)) == first.replace(b'"seq":1', b'"seq":2')
    # A new object with other values is encoded afresh (the cache goes by identity, not equality).
    changed = [parts[0], Part("b", 3.0)]
    assert json.loads(_lite.encode(Whole(3, changed)))["parts"][1]["value"] == 3.0
    # Cached structs inside cached structs, and a string that looks like JSON, stay intact.
    nested = [Part('{"x":1}', 0.0, []), Part("n", 1.0, [])]
    doc = {"outer": [CachedKey(7), {"deep": [CachedKey(8)]}], "parts": nested}
    for _ in range(2):
        assert json.loads(_lite.encode(doc)) == {
            "outer": [{"a": 7}, {"deep": [{"a": 8}]}],
            "parts": [
                {"name": '{"x":1}', "value": 0.0, "inner": []},
                {"name": "n", "value": 1.0, "inner": []},
            ],
        }


def test_a_full_report_encoded_twice_by_lite_is_the_same_bytes_as_msgspec() -> None:
    doc = a_report()
    probe = LITE_CHILD.replace(
        'out.append(["ok", wire.encode(obj).decode()])',
        'out.append(["ok", wire.encode(obj).decode()]); out.append(["again", wire.encode(obj).decode()])',
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "agents"))
    proc = subprocess.run([sys.executable, "-c", probe], input=json.dumps([["Report", doc]]), capture_output=True,
                          text=True, timeout=60, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (_, once), (_, again) = json.loads(proc.stdout)
    assert once == again == encode(msgspec.convert(doc, Report)).decode()


class Holder(_lite.Struct, frozen=True):
    __lite_cache_lists__: ClassVar[tuple[str, ...]] = ("items", "more")
    first: CachedKey
    items: list[CachedKey] = []
    middle: Part | None = None
    more: list[Part] = []


def test_cached_lists_and_structs_in_any_order_land_in_their_places() -> None:
    items, more = [CachedKey(1), CachedKey(2)], [Part("p", 1.0, [Key(3)])]
    for first in (CachedKey(0), CachedKey(9)):  # a new first object, the same lists
        h = Holder(first, items, Part("m", 2.0), more)
        for _ in range(2):
            assert json.loads(_lite.encode(h)) == _lite.to_builtins(h)
    empty = Holder(CachedKey(5))
    assert json.loads(_lite.encode(empty)) == {"first": {"a": 5}, "items": [], "middle": None, "more": []}
