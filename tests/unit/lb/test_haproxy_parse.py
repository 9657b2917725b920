"""Parsing HAProxy runtime-API answers captured from a real HAProxy 2.6 (see data/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudmon.lb.haproxy import (
    HaproxyRuntime,
    LbError,
    admin_state,
    check_name,
    merge_server_states,
    parse_servers_state,
    parse_stat_csv,
)

DATA = Path(__file__).parent / "data"
STATE = (DATA / "show_servers_state.txt").read_text()
STAT = (DATA / "show_stat.csv").read_text()


def test_servers_state_rows_follow_the_header() -> None:
    rows = parse_servers_state(STATE)
    assert [(r["be_name"], r["srv_name"]) for r in rows] == [
        ("app", "web-1"),
        ("app", "web-2"),
        ("app", "web-3"),
        ("api", "api-1"),
    ]
    assert rows[2]["srv_uweight"] == "37"
    assert rows[2]["srv_iweight"] == "100"
    assert rows[0]["srv_admin_state"] == "8"


def test_stat_csv_keeps_every_row_with_named_columns() -> None:
    rows = parse_stat_csv(STAT)
    names = [(r["pxname"], r["svname"]) for r in rows]
    assert ("fe", "FRONTEND") in names
    assert ("app", "BACKEND") in names
    web3 = next(r for r in rows if r["svname"] == "web-3")
    assert web3["scur"] == "1"
    assert web3["stot"] == "3"
    assert web3["addr"] == "127.0.0.1:18083"


def test_merge_gives_state_weight_and_sessions_of_one_backend() -> None:
    servers = merge_server_states("app", parse_servers_state(STATE), parse_stat_csv(STAT))
    assert [s.name for s in servers] == ["web-1", "web-2", "web-3"]
    web1, web2, web3 = servers
    assert (web1.state, web1.status, web1.op_state) == ("drain", "DRAIN", "running")
    assert (web2.state, web2.status, web2.op_state) == ("maint", "MAINT", "stopped")
    assert (web3.state, web3.weight, web3.initial_weight) == ("ready", 37, 100)
    assert (web3.sessions, web3.total_sessions, web3.queue, web3.outstanding) == (1, 3, 0, 1)
    assert web3.address == "127.0.0.1:18083"
    assert web1.sessions == 0
    (api,) = merge_server_states("api", parse_servers_state(STATE), parse_stat_csv(STAT))
    assert (api.name, api.weight, api.total_sessions) == ("api-1", 1, 0)


def test_unknown_backend_merges_to_nothing() -> None:
    assert merge_server_states("nope", parse_servers_state(STATE), parse_stat_csv(STAT)) == []


@pytest.mark.parametrize(
    ("flags", "state"),
    [
        (0, "ready"),
        (8, "drain"),
        (0x10, "drain"),
        (1, "maint"),
        (0x20, "maint"),
        (9, "maint"),
        (0x40, "ready"),
    ],
)
def test_admin_state_bits(flags: int, state: str) -> None:
    assert admin_state(flags) == state


@pytest.mark.parametrize("answer", ["Can't find backend.\n\n", "No such proxy.\n\n", ""])
def test_error_answers_are_not_parsed_as_data(answer: str) -> None:
    with pytest.raises(LbError, match="unexpected answer"):
        parse_servers_state(answer)
    with pytest.raises(LbError, match="unexpected answer"):
        parse_stat_csv(answer)


@pytest.mark.parametrize("name", ["app; shutdown sessions", "a b", "x\nshow info", "", "a/b"])
def test_names_that_could_smuggle_commands_are_refused(name: str) -> None:
    with pytest.raises(LbError, match="invalid HAProxy server name"):
        check_name("server", name)


def test_runtime_address_forms() -> None:
    assert HaproxyRuntime("/run/haproxy/admin.sock")._unix == "/run/haproxy/admin.sock"
    assert HaproxyRuntime("unix:/run/h.sock")._unix == "/run/h.sock"
    assert HaproxyRuntime("127.0.0.1:9999")._tcp == ("127.0.0.1", 9999)
    assert HaproxyRuntime("[::1]:9999")._tcp == ("::1", 9999)
    with pytest.raises(LbError, match="no valid port"):
        HaproxyRuntime("localhost:http")
    with pytest.raises(LbError, match="no HAProxy runtime socket"):
        HaproxyRuntime("")
