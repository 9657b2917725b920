"""MongoDB backend specifics on a real MongoDB-protocol server (secantusd-py, see
shared/notes/MONGODB.md), plus an opt-in run against a genuine mongod (CLOUDMON_TEST_MONGO_URI)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pymongo
import pytest

from cloudmon.store import Sample, StoreUnavailable, open_store
from cloudmon.store.mongodb import MongoStore
from tests.servers import MongoServer, free_port


def minute(node: str, start: float, n: int = 60, offset: float = 0.0) -> list[Sample]:
    return [Sample(node, start + i, {"cpu.percent": i + offset, "mem.used": 1000.0 + i}) for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    srv = MongoServer.start(tmp_path_factory.mktemp("mongo"))
    try:
        yield srv
    finally:
        srv.close()


def _with_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture
def db_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(server: MongoServer, db_name: str) -> Iterator[MongoStore]:
    st = open_store(_with_db(server.url, db_name))
    assert isinstance(st, MongoStore)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def db(server: MongoServer, db_name: str) -> Iterator[Any]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(server.url)
    try:
        yield client[db_name]
    finally:
        client.close()


@pytest.fixture
def hour() -> float:
    return float(int(time.time()) // 3600 * 3600 - 3 * 3600)


def test_samples_live_in_time_series_collections_per_tier(store: MongoStore, db: Any, hour: float) -> None:
    store.write_samples(minute("a", hour, 3))
    options = {c["name"]: c.get("options", {}) for c in db.list_collections()}
    for name, gran, expiry in (
        ("samples_raw", "seconds", 86400),
        ("samples_1m", "minutes", 30 * 86400),
        ("samples_1h", "hours", 365 * 86400),
    ):
        assert options[name]["timeseries"] == {"timeField": "ts", "metaField": "meta", "granularity": gran}
        assert options[name]["expireAfterSeconds"] == expiry
        keys = [list(ix["key"]) for ix in db[name].list_indexes()]
        assert ["meta.node", "ts"] in keys
    doc = db.samples_raw.find_one({"meta.node": "a"}, sort=[("ts", 1)])
    assert doc["meta"] == {"node": "a", "tier": "raw"}
    assert doc["v"] == {"cpu%2Epercent": 0.0, "mem%2Eused": 1000.0}


def test_duplicates_are_stopped_by_the_key_collection(store: MongoStore, db: Any, hour: float) -> None:
    batch = minute("a", hour)
    store.write_samples(batch)
    store.write_samples(batch[::-1])  # replayed, reversed
    store.flush()
    store.write_samples(batch[5:10])
    store.flush()
    assert db.samples_raw.count_documents({"meta.node": "a"}) == 60
    assert db.sample_keys.count_documents({}) == 60
    res = store.series("a", ["cpu.percent"], hour, hour + 60, 60)
    assert res.tier == "1m"
    assert res.metrics["cpu.percent"].avg == pytest.approx([29.5])


def test_late_samples_write_a_newer_rollup_version(store: MongoStore, db: Any, hour: float) -> None:
    store.write_samples(minute("a", hour, 59))
    store.flush()
    assert store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"].max == [58.0]
    store.write_samples([Sample("a", hour + 59, {"cpu.percent": 59.0, "mem.used": 1059.0})])
    store.flush()
    assert db.samples_1m.count_documents({"meta.node": "a"}) == 2  # versions, never updated in place
    one = store.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
    assert one.max == [59.0]
    assert one.avg == pytest.approx([29.5])
    hourly = store.series("a", ["cpu.percent"], hour, hour + 3600, 3600)
    assert hourly.tier == "1h"
    assert hourly.metrics["cpu.percent"].avg == pytest.approx([29.5])


def test_out_of_order_samples_are_stored(store: MongoStore, hour: float) -> None:
    batch = minute("a", hour)
    store.write_samples(batch[30:])
    store.write_samples(batch[:30])
    raw = store.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
    assert raw.avg == [float(i) for i in range(60)]
    latest = store.latest("a")
    assert latest is not None
    assert latest.ts == hour + 59
    assert dict(latest.values) == {"cpu.percent": 59.0, "mem.used": 1059.0}


def test_retention_deletes_by_time_and_queries_respect_the_horizon(
    store: MongoStore, db: Any, hour: float
) -> None:
    store.write_samples(minute("a", hour, 60) + minute("a", hour + 60, 60))
    store.flush()
    raw_ret = store.tiers[0].retention_s
    assert store.enforce_retention(hour + 60 + raw_ret) == 60
    assert db.samples_raw.count_documents({}) == 60
    assert store.enforce_retention(hour + 60 + raw_ret) == 0


def test_an_unreachable_server_names_the_url_without_its_password() -> None:
    url = f"mongodb://ops:s3cret@127.0.0.1:{free_port()}/x?serverSelectionTimeoutMS=300"
    st = open_store(url)
    try:
        with pytest.raises(StoreUnavailable) as info:
            st.latest("a")
        text = str(info.value)
        assert "s3cret" not in text
        assert "mongodb://ops:***@127.0.0.1" in text
        assert "start mongod" in text
    finally:
        st.close()


def test_outage_then_recovery_on_the_same_port(tmp_path: Path, hour: float) -> None:
    srv = MongoServer.start(tmp_path / "mongo")
    try:
        st = open_store(srv.url.replace("serverSelectionTimeoutMS=3000", "serverSelectionTimeoutMS=500"))
        try:
            st.write_samples(minute("a", hour, 30))
            srv.stop()
            with pytest.raises(StoreUnavailable, match="cannot reach"):
                st.write_samples(minute("a", hour + 30, 30, offset=30.0))
            srv.restart()
            st.write_samples(minute("a", hour + 30, 30, offset=30.0))
            st.flush()
            raw = st.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
            assert raw.avg == [float(i) for i in range(60)]
            one = st.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
            assert one.avg == pytest.approx([29.5])
        finally:
            st.close()
    finally:
        srv.close()


GENUINE = os.environ.get("CLOUDMON_TEST_MONGO_URI")


@pytest.mark.mongodb_genuine
@pytest.mark.skipif(
    not GENUINE, reason="set CLOUDMON_TEST_MONGO_URI=mongodb://… to run against a genuine MongoDB"
)
def test_genuine_mongodb_round_trip(hour: float) -> None:
    assert GENUINE is not None
    name = f"cloudmon_test_{uuid.uuid4().hex[:8]}"
    url = _with_db(GENUINE, name)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(GENUINE)
    st = open_store(url)
    try:
        batch = minute("a", hour)
        st.write_samples(batch[30:])
        st.write_samples(batch)
        st.flush()
        types = {c["name"]: c.get("type") for c in client[name].list_collections()}
        assert types["samples_raw"] == "timeseries"
        assert types["samples_1m"] == "timeseries"
        raw = st.series("a", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
        assert raw.avg == [float(i) for i in range(60)]
        one = st.series("a", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
        assert one.avg == pytest.approx([29.5])
        plan = client[name].samples_raw.find({"meta.node": "a", "ts": {"$gte": 0}}).explain()
        assert "COLLSCAN" not in str(plan.get("queryPlanner", {}).get("winningPlan"))
    finally:
        st.close()
        client.drop_database(name)
        client.close()


class _Killed(BaseException):
    """Stands for SIGKILL inside write_samples: nothing in the store may catch it and clean up."""


def test_a_writer_killed_between_keys_and_samples_loses_nothing_on_replay(
    server: MongoServer, db_name: str, db: Any, hour: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _with_db(server.url, db_name)
    crashed, survivor = MongoStore(url), MongoStore(url)

    def killed(docs: list[dict[str, Any]]) -> None:
        raise _Killed

    try:
        batch = minute("n", hour)
        # Fault injection: the keys of the batch are in, its samples are not.
        monkeypatch.setattr(crashed, "_insert_raw", killed)
        with pytest.raises(_Killed):
            crashed.write_samples(batch)
        monkeypatch.undo()
        assert db.sample_keys.count_documents({}) == 60
        assert db.samples_raw.count_documents({}) == 0
        survivor.write_samples(batch)  # the collector's queue replays the claimed entry
        survivor.write_samples(batch)  # a second replay: now a plain duplicate
        survivor.flush()
        assert db.samples_raw.count_documents({"meta.node": "n"}) == 60
        assert db.sample_keys.count_documents({"pending": False}) == 60
        raw = survivor.series("n", ["cpu.percent"], hour, hour + 60, 1).metrics["cpu.percent"]
        assert raw.avg == [float(i) for i in range(60)]
        res = survivor.series("n", ["cpu.percent"], hour, hour + 60, 60)
        assert res.tier == "1m"
        assert res.metrics["cpu.percent"].avg == pytest.approx([29.5])
    finally:
        monkeypatch.undo()
        crashed.close()
        survivor.close()


def test_a_writer_killed_between_claim_and_write_leaves_its_buckets_to_the_others(
    server: MongoServer, db_name: str, db: Any, hour: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _with_db(server.url, db_name)
    now = [time.time()]
    crashed = MongoStore(url, lease_s=30, clock=lambda: now[0])
    survivor = MongoStore(url, lease_s=30, clock=lambda: now[0])

    def killed(jobs: list[tuple[int, int, str]]) -> None:
        raise _Killed

    try:
        # Fault injection: the writer dies after claiming bucket 0's mark, before writing it.
        monkeypatch.setattr(crashed, "_recompute_jobs", killed)
        with pytest.raises(_Killed):
            crashed.write_samples(minute("n", hour, 60) + minute("n", hour + 60, 16))
        monkeypatch.undo()
        survivor.write_samples(minute("n", hour + 60, 60) + minute("n", hour + 120, 20))
        survivor.flush()
        res = survivor.series("n", ["cpu.percent"], hour, hour + 120, 60)
        assert res.tier == "1m"
        # While the dead writer's lease runs, its bucket is not built (a live writer may be on it).
        assert res.metrics["cpu.percent"].avg == [None, 29.5]
        now[0] += 31
        fresh = MongoStore(url, lease_s=30, clock=lambda: now[0])
        try:
            fresh.flush()  # any writer reclaims marks whose lease expired
        finally:
            fresh.close()
        got = survivor.series("n", ["cpu.percent"], hour, hour + 120, 60).metrics["cpu.percent"]
        assert got.avg == [29.5, 29.5]
        assert got.max == [59.0, 59.0]
        hourly = survivor.series("n", ["cpu.percent"], hour, hour + 3600, 3600)
        assert hourly.tier == "1h"
        assert hourly.metrics["cpu.percent"].avg == pytest.approx([(29.5 * 120 + 9.5 * 20) / 140])
        assert db.rollup_dirty.count_documents({}) == 0
    finally:
        monkeypatch.undo()
        crashed.close()
        survivor.close()


def test_a_bucket_marked_again_during_its_recomputation_is_redone(
    store: MongoStore, db: Any, hour: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store._recompute_jobs
    # Another collector that only writes (its own rollup step switched off, so that the redo can
    # only come from the mark it leaves).
    other = MongoStore(store.url)
    monkeypatch.setattr(other, "_recompute", lambda upto_ms, limit: 0)

    def then_a_late_sample(jobs: list[tuple[int, int, str]]) -> None:
        real(jobs)
        # The bucket is written; before its mark is released, a late sample of it arrives.
        other.write_samples([Sample("n", hour + 59.5, {"cpu.percent": 1000.0})])

    try:
        store.write_samples(minute("n", hour, 59))
        monkeypatch.setattr(store, "_recompute_jobs", then_a_late_sample)
        store.write_samples(minute("n", hour + 60, 16))
        monkeypatch.undo()
        store.flush()
        got = store.series("n", ["cpu.percent"], hour, hour + 60, 60).metrics["cpu.percent"]
        assert got.max == [1000.0]
        assert got.avg == pytest.approx([(sum(range(59)) + 1000.0) / 60])
    finally:
        monkeypatch.undo()
        other.close()
