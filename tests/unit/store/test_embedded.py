"""Embedded (SQLite) store: tiers, rollups, compaction, layouts, durability and errors, on real files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmon.store import (
    DEFAULT_TIERS,
    NodeRecord,
    Sample,
    StoreError,
    StoreUnavailable,
    TierSpec,
    open_store,
)
from cloudmon.store.embedded import EmbeddedStore, parse_url

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "telemetry.db"


@pytest.fixture
def opened(db: Path) -> Iterator[list[EmbeddedStore]]:
    """Stores opened by a test; all closed after it, pass or fail."""
    stores: list[EmbeddedStore] = []
    try:
        yield stores
    finally:
        for s in stores:
            s.close()


class OpenDb(Protocol):
    def __call__(
        self,
        tiers: Sequence[TierSpec] = DEFAULT_TIERS,
        *,
        grace_s: float = 10.0,
        max_size_bytes: int | None = None,
    ) -> EmbeddedStore: ...


@pytest.fixture
def open_db(db: Path, opened: list[EmbeddedStore]) -> OpenDb:
    """``open_db(tiers=..., grace_s=..., max_size_bytes=...)`` opens ``db``; the fixture closes it."""

    def open_(
        tiers: Sequence[TierSpec] = DEFAULT_TIERS, *, grace_s: float = 10.0, max_size_bytes: int | None = None
    ) -> EmbeddedStore:
        store = EmbeddedStore(f"sqlite://{db}", tiers, grace_s=grace_s, max_size_bytes=max_size_bytes)
        opened.append(store)
        return store

    return open_


def minute(node: str, start: float, n: int = 60, base: float = 0.0) -> list[Sample]:
    return [Sample(node, start + i, {"cpu": base + i, "mem": 2.0 * i}) for i in range(n)]


def rows(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Look at the file itself (a separate, read-only connection)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


# -- URLs and tiers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://x/y.db",
        "sqlite://relative.db",
        "sqlite://host/abs/x.db",
        "sqlite:///",
        "sqlite:///tmp/dir/",
        "sqlite:///tmp/x.db?mode=ro",
        "sqlite:",
    ],
)
def test_bad_urls_are_refused_with_the_fix(url: str) -> None:
    with pytest.raises(StoreError, match=r"sqlite:///abs/path/file\.db"):
        parse_url(url)


def test_urls_name_absolute_files(tmp_path: Path) -> None:
    assert parse_url(f"sqlite://{tmp_path}/a.db") == tmp_path / "a.db"
    assert parse_url(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"  # four slashes, SQLAlchemy style
    assert parse_url("sqlite:///tmp/with%20space.db") == Path("/tmp/with space.db")


def test_open_store_creates_parent_directories(db: Path) -> None:
    store = open_store(f"sqlite://{db}")
    try:
        assert isinstance(store, EmbeddedStore)
        assert db.is_file()
    finally:
        store.close()
    assert not Path(f"{db}-wal").exists()  # every connection closed: SQLite removed its WAL


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory"):
        EmbeddedStore(f"sqlite://{tmp_path}")


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ((), "raw tier"),
        ((TierSpec("1m", 60, 3600),), "raw tier"),
        ((TierSpec("raw", 1, 60), TierSpec("raw", 60, 60)), "unique"),
        ((TierSpec("raw", 1, 60), TierSpec("bad name", 60, 60)), "bad name"),
        ((TierSpec("raw", 1, 60), TierSpec("a", 60, 60), TierSpec("b", 90, 60)), "multiple"),
        ((TierSpec("raw", 1, 0),), "retention"),
    ],
)
def test_bad_tiers_are_refused(tmp_path: Path, tiers: tuple[TierSpec, ...], message: str) -> None:
    with pytest.raises(StoreError, match=message):
        EmbeddedStore(f"sqlite://{tmp_path}/x.db", tiers)


def test_reopening_with_another_resolution_for_a_tier_is_refused(open_db: OpenDb) -> None:
    open_db().close()
    with pytest.raises(StoreError, match="resolution"):
        open_db(tiers=(TierSpec("raw", 1, 3600), TierSpec("1m", 30, 3600)))


# -- tiers and rollups ------------------------------------------------------------------------------


def test_series_picks_the_coarsest_tier_not_finer_than_step(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    store.write_samples(minute("a", hour, 120))
    picked = {
        step: store.series("a", ["cpu"], hour, hour + 7200, step).tier
        for step in (1, 30, 60, 120, 3600, 7200)
    }
    assert picked == {1: "raw", 30: "raw", 60: "1m", 120: "1m", 3600: "1h", 7200: "1h"}


def test_series_falls_back_to_a_coarser_tier_when_the_finer_one_dropped_the_range(
    open_db: OpenDb, hour: float
) -> None:
    store = open_db()
    store.write_samples(minute("a", hour, 180))
    store.flush()
    assert store.series("a", ["cpu"], hour, hour + 180, 1).tier == "raw"
    store.enforce_retention(hour + 86400 + 600)  # the raw tier no longer holds that hour
    res = store.series("a", ["cpu"], hour, hour + 180, 1)
    assert res.tier == "1m"
    avg = res.metrics["cpu"].avg
    assert [avg[0], avg[60], avg[120]] == pytest.approx([29.5, 89.5, 149.5])  # minutes at their start
    assert avg.count(None) == 177


def test_rollups_hold_exact_avg_min_max(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    for m in range(120):  # two hours, one sample per second; minute m has cpu = 1000 m + i
        store.write_samples(minute("a", hour + 60 * m, 60, base=1000.0 * m))
    store.flush()
    one = store.series("a", ["cpu"], hour, hour + 7200, 60).metrics["cpu"]
    assert one.avg[:3] == pytest.approx([29.5, 1029.5, 2029.5])
    assert one.min[119] == 119000.0
    assert one.max[119] == 119059.0
    hours = store.series("a", ["cpu", "mem"], hour, hour + 7200, 3600)
    assert hours.tier == "1h"
    assert hours.metrics["cpu"].avg == pytest.approx([29529.5, 89529.5])
    assert hours.metrics["cpu"].min == [0.0, 60000.0]
    assert hours.metrics["cpu"].max == [59059.0, 119059.0]
    assert hours.metrics["mem"].max == [118.0, 118.0]
    # One row per node and bucket in each tier.
    assert rows(store.path, "SELECT COUNT(*) FROM rollup_1m")[0][0] == 120
    assert rows(store.path, "SELECT COUNT(*) FROM rollup_1h")[0][0] == 2


def test_rollups_are_current_before_compaction(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    store.write_samples(minute("a", hour, 90))  # the last 30 s are still in the head
    res = store.series("a", ["cpu"], hour, hour + 120, 60)
    assert res.metrics["cpu"].avg == pytest.approx([29.5, 74.5])
    assert res.metrics["cpu"].max == [59.0, 89.0]


@given(
    points=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=299),
            st.one_of(st.none(), st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)),
        ),
        min_size=1,
        max_size=120,
        unique_by=lambda p: p[0],
    ),
    batch=st.integers(min_value=1, max_value=50),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_rollups_equal_a_direct_computation(
    points: list[tuple[int, float | None]], batch: int, hour: float
) -> None:
    samples = [
        Sample("p", hour + sec + 0.25, {"x": 1.0} if v is None else {"x": 1.0, "v": v}) for sec, v in points
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddedStore(f"sqlite://{tmp}/p.db", grace_s=0)
        try:
            for i in range(0, len(samples), batch):
                store.write_samples(samples[i : i + batch])
            store.flush()
            got = store.series("p", ["v"], hour, hour + 300, 60).metrics["v"]
            raw = store.series("p", ["v"], hour, hour + 300, 1).metrics["v"]
        finally:
            store.close()
    for m in range(5):
        vals = [v for sec, v in points if v is not None and sec // 60 == m]
        if vals:
            assert got.avg[m] == pytest.approx(sum(vals) / len(vals), rel=1e-9, abs=1e-6)
            assert (got.min[m], got.max[m]) == (min(vals), max(vals))
        else:
            assert (got.avg[m], got.min[m], got.max[m]) == (None, None, None)
    assert raw.avg == [dict(points).get(sec) for sec in range(300)]


def test_a_partial_bucket_is_merged_across_close_and_reopen(open_db: OpenDb, db: Path, hour: float) -> None:
    samples = minute("a", hour, 60)
    first = open_db()
    first.write_samples(samples[:25])
    first.close()  # writes the partial minute
    second = open_db()
    second.write_samples(samples[25:])
    second.flush()
    res = second.series("a", ["cpu"], hour, hour + 60, 60).metrics["cpu"]
    assert res.avg == pytest.approx([29.5])
    assert (res.min, res.max) == ([0.0], [59.0])
    assert rows(db, "SELECT COUNT(*) FROM rollup_1m")[0][0] == 1
    assert rows(db, "SELECT COUNT(*) FROM blocks")[0][0] == 2
    assert second.series("a", ["cpu"], hour, hour + 60, 1).metrics["cpu"].avg == [float(i) for i in range(60)]


def test_late_samples_merge_into_closed_buckets_once(open_db: OpenDb, hour: float) -> None:
    store = open_db(grace_s=0)
    for m in range(5):
        store.write_samples(minute("a", hour + 60 * m, 60))
    late = Sample("a", hour + 30.5, {"cpu": 1000.0})
    store.write_samples([late])
    store.write_samples([late])  # replayed: still once
    store.flush()
    one = store.series("a", ["cpu"], hour, hour + 60, 60).metrics["cpu"]
    assert one.avg == pytest.approx([(1770.0 + 1000.0) / 61])
    assert one.max == [1000.0]
    raw = store.series("a", ["cpu"], hour + 30, hour + 31, 1).metrics["cpu"]
    assert raw.avg == [515.0]
    assert store.series("a", ["cpu"], hour, hour + 3600, 3600).metrics["cpu"].max == [1000.0]


def test_a_node_with_a_lagging_clock_is_visible_at_once_and_stored_in_whole_blocks(
    open_db: OpenDb, db: Path, hour: float
) -> None:
    store = open_db(grace_s=0)
    for sec in range(600):  # "slow" reports 5 minutes behind everyone else
        store.write_samples(
            [Sample("ok", hour + 300 + sec, {"cpu": 1.0}), Sample("slow", hour + sec, {"cpu": float(sec)})]
        )
        if sec % 97 == 0:
            got = store.latest("slow")
            assert got is not None
            assert got.ts == hour + sec
    store.flush()
    raw = store.series("slow", ["cpu"], hour, hour + 600, 1).metrics["cpu"].avg
    assert raw == [float(s) for s in range(600)]
    key = rows(db, "SELECT node_key FROM series_nodes WHERE node_id='slow'")[0][0]
    assert len(rows(db, "SELECT 1 FROM blocks WHERE node_key=?", key)) < 30  # not one per write
    one = store.series("slow", ["cpu"], hour, hour + 600, 60).metrics["cpu"].avg
    assert one == pytest.approx([60 * m + 29.5 for m in range(10)])


def test_replays_after_compaction_and_reopen_are_ignored(open_db: OpenDb, db: Path, hour: float) -> None:
    samples = [s for m in range(3) for s in minute("a", hour + 60 * m, 60)]
    store = open_db()
    store.write_samples(samples)
    store.close()
    store = open_db()
    store.write_samples(samples)
    store.write_samples([Sample("a", hour + 10, {"cpu": -5.0})])
    store.flush()
    assert rows(db, "SELECT COUNT(*) FROM blocks")[0][0] == 3
    assert store.series("a", ["cpu"], hour, hour + 180, 60).metrics["cpu"].avg == pytest.approx([29.5] * 3)
    assert store.series("a", ["cpu"], hour + 10, hour + 11, 1).metrics["cpu"].min == [10.0]


# -- layouts ------------------------------------------------------------------------------------------


def test_layouts_grow_and_old_rows_keep_their_names(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    store.write_samples([Sample("a", hour + i, {"cpu": float(i)}) for i in range(30)])
    store.write_samples([Sample("a", hour + i, {"cpu": float(i), "gpu": 10.0 + i}) for i in range(30, 90)])
    store.write_samples([Sample("a", hour + 90, {"gpu": 5.0})])
    assert store.metric_names("a") == ["cpu", "gpu"]
    res = store.series("a", ["cpu", "gpu"], hour, hour + 91, 1)
    assert res.metrics["gpu"].avg[:30] == [None] * 30
    assert res.metrics["gpu"].avg[30] == 40.0
    assert res.metrics["cpu"].avg[89:] == [89.0, None]
    store.flush()  # blocks mixing both layouts
    res = store.series("a", ["cpu", "gpu"], hour, hour + 120, 60)
    assert res.metrics["gpu"].avg == pytest.approx([54.5, (sum(range(70, 100)) + 5.0) / 31])
    assert res.metrics["cpu"].avg == pytest.approx([29.5, 74.5])


def test_a_node_that_drops_most_metrics_starts_a_short_layout(open_db: OpenDb, db: Path, hour: float) -> None:
    store = open_db()
    wide = {f"vm.{i}.cpu": float(i) for i in range(40)}
    store.write_samples([Sample("h", hour + i, {"cpu": 1.0, **wide}) for i in range(10)])
    store.write_samples([Sample("h", hour + 10 + i, {"cpu": 2.0, "vm.0.cpu": 3.0}) for i in range(10)])
    lengths = {r[0] for r in rows(db, "SELECT json_array_length(names) FROM layouts")}
    assert lengths == {0, 41, 2}  # empty (new node), wide, then a fresh short one instead of 41 mostly NaN
    current = "SELECT json_array_length(l.names) FROM series_nodes s JOIN layouts l ON l.id = s.layout"
    assert rows(db, current) == [(2,)]
    assert len(store.metric_names("h")) == 41
    res = store.series("h", ["vm.39.cpu", "vm.0.cpu"], hour, hour + 20, 1)
    assert res.metrics["vm.39.cpu"].avg == [39.0] * 10 + [None] * 10
    assert res.metrics["vm.0.cpu"].avg == [0.0] * 10 + [3.0] * 10


def test_bad_values_name_the_metric_and_store_nothing(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    with pytest.raises(ValueError, match="'mem'"):
        store.write_samples([Sample("a", hour, {"cpu": 1.0}), Sample("a", hour + 1, {"mem": "x"})])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="ts"):
        store.write_samples([Sample("a", float("nan"), {"cpu": 1.0})])
    with pytest.raises(ValueError, match="node_id"):
        store.write_samples([Sample("", hour, {"cpu": 1.0})])
    assert store.latest("a") is None
    assert store.metric_names("a") == []
    store.write_samples([Sample("a", hour, {"cpu": 1.0})])
    assert store.metric_names("a") == ["cpu"]


# -- durability ---------------------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(open_db: OpenDb, hour: float) -> None:
    store = open_db()
    for m in range(3):
        store.write_samples(minute("a", hour + 60 * m, 60))
    store.write_samples([Sample("b", hour + 5, {"disk": 7.0})])
    store.upsert_nodes([NodeRecord("a", "host-a", hour, hour + 179, {"os": "Linux"})])
    store.close()
    store = open_db()
    assert store.latest("a") == Sample("a", hour + 179, {"cpu": 59.0, "mem": 118.0})
    assert store.metric_names("b") == ["disk"]
    assert [n.hostname for n in store.nodes()] == ["host-a"]
    assert store.series("a", ["cpu"], hour, hour + 180, 1).metrics["cpu"].avg[170] == 50.0
    assert store.series("a", ["cpu"], hour, hour + 180, 60).metrics["cpu"].avg == pytest.approx([29.5] * 3)
    assert store.series("a", ["mem"], hour, hour + 3600, 3600).metrics["mem"].max == [118.0]


CRASH = """
import os, sys
from cloudmon.store import Sample
from cloudmon.store.embedded import EmbeddedStore
db, hour = sys.argv[1], float(sys.argv[2])
store = EmbeddedStore("sqlite://" + db)
for m in range(3):
    store.write_samples([Sample("a", hour + 60 * m + i, {"cpu": float(i)}) for i in range(60)])
os._exit(0)  # no close(), no flush(): like a power cut after the writes returned
"""


def test_committed_samples_survive_a_crash(open_db: OpenDb, db: Path, hour: float) -> None:
    db.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", CRASH, str(db), str(hour)], cwd=ROOT, check=True, timeout=60)
    store = open_db()
    assert (
        store.series("a", ["cpu"], hour, hour + 180, 1).metrics["cpu"].avg
        == [float(i) for i in range(60)] * 3
    )
    store.flush()
    assert store.series("a", ["cpu"], hour, hour + 180, 60).metrics["cpu"].avg == pytest.approx([29.5] * 3)


def test_retention_is_per_tier(open_db: OpenDb, db: Path, hour: float) -> None:
    tiers = (TierSpec("raw", 1, 2 * 3600), TierSpec("1m", 60, 6 * 3600), TierSpec("1h", 3600, 30 * 86400))
    store = open_db(tiers=tiers)
    for m in range(10):
        store.write_samples(minute("a", hour + 60 * m, 60))
    store.flush()
    removed = store.enforce_retention(hour + 2 * 3600 + 300)  # raw cut-off: hour + 300
    assert removed == 5
    assert rows(db, "SELECT MIN(t0_ms) FROM blocks")[0][0] == (hour + 300) * 1000
    assert rows(db, "SELECT COUNT(*) FROM rollup_1m")[0][0] == 10
    assert store.enforce_retention(hour + 2 * 3600 + 300) == 0
    removed = store.enforce_retention(hour + 6 * 3600 + 600)  # everything raw and 1m goes; 1h stays
    assert removed == 5 + 10
    assert rows(db, "SELECT COUNT(*) FROM rollup_1h")[0][0] == 1
    res = store.series("a", ["cpu"], hour, hour + 3600, 60)
    assert res.tier == "1h"
    assert res.metrics["cpu"].avg[0] == pytest.approx(29.5)


def test_a_reader_never_sees_a_half_compacted_minute(open_db: OpenDb, hour: float) -> None:
    store = open_db(grace_s=0)
    store.write_samples([s for n in ("a", "b") for s in minute(n, hour, 60)])
    bad: list[object] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            got = store.series("a", ["cpu"], hour, hour + 60, 60).metrics["cpu"].avg
            if got != pytest.approx([29.5]):
                bad.append(got)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for m in range(1, 30):  # every write compacts the minute before
            store.write_samples([s for n in ("a", "b") for s in minute(n, hour + 60 * m, 60)])
    finally:
        done.set()
        reader.join(30)
    assert not reader.is_alive()
    assert bad == []


# -- errors: read-only, corrupt, full -----------------------------------------------------------------------


@pytest.fixture
def make_read_only() -> Iterator[Callable[[Path], None]]:
    """Make a path unwritable even for root (``chattr +i``), undone after the test."""
    done: list[Path] = []

    def apply(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o555 if path.is_dir() else 0o444)
        else:
            result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot make {path} immutable here: {result.stderr.decode().strip()}")
        done.append(path)

    try:
        yield apply
    finally:
        for path in done:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], check=False)
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_read_only_file_gives_a_clear_error_and_keeps_the_data(
    open_db: OpenDb, db: Path, hour: float, make_read_only: Callable[[Path], None]
) -> None:
    store = open_db()
    store.write_samples(minute("a", hour, 10))
    store.close()
    make_read_only(db)
    with pytest.raises(StoreUnavailable, match="read-only") as info:
        open_db()
    assert str(db) in str(info.value)
    assert rows(db, "SELECT COUNT(*) FROM blocks")[0][0] == 1


def test_a_read_only_directory_gives_a_clear_error(
    tmp_path: Path, make_read_only: Callable[[Path], None]
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    make_read_only(folder)
    with pytest.raises(StoreUnavailable, match="cannot open") as info:
        EmbeddedStore(f"sqlite://{folder}/new.db")
    assert str(folder / "new.db") in str(info.value)


def test_a_corrupt_file_is_reported_and_left_alone(db: Path) -> None:
    db.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    with pytest.raises(StoreUnavailable, match="corrupt") as info:
        EmbeddedStore(f"sqlite://{db}")
    assert str(db) in str(info.value)
    assert db.read_bytes() == garbage


def test_another_applications_database_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="another application"):
        EmbeddedStore(f"sqlite://{db}")


def test_a_full_disk_fails_clearly_and_keeps_what_was_committed(
    open_db: OpenDb, db: Path, hour: float
) -> None:
    store = open_db(max_size_bytes=2_000_000)
    names = {f"m{i}": float(i) for i in range(40)}
    written = 0
    error: StoreUnavailable | None = None
    while error is None and written < 100_000:
        try:
            store.write_samples([Sample(f"n{k}", hour + written, names) for k in range(20)])
            written += 1
        except StoreUnavailable as exc:
            error = exc
    assert error is not None
    assert "disk full" in str(error)
    assert str(db) in str(error)
    assert written > 10
    store.close()
    store = open_db()
    for k in (0, 19):
        got = store.series(f"n{k}", ["m7"], hour, hour + written + 5, 1).metrics["m7"].avg
        assert got == [7.0] * written + [None] * 5
    store.write_samples([Sample("n0", hour + written + 1, names)])  # usable again without the cap


def test_a_resend_older_than_raw_retention_is_skipped_not_counted_twice(
    open_db: OpenDb, hour: float
) -> None:
    tiers = (TierSpec("raw", 1, 2 * 3600), TierSpec("1m", 60, 6 * 3600), TierSpec("1h", 3600, 30 * 86400))
    store = open_db(tiers=tiers)
    first = minute("a", hour, 60)
    store.write_samples(first)
    store.flush()
    store.enforce_retention(hour + 2 * 3600 + 300)  # the raw originals of that minute are gone
    # An agent resends the acknowledged batch much later (other values make a
    # second fold visible in the average).
    store.write_samples(minute("a", hour, 60, base=1000.0))
    store.flush()
    assert store.skipped_expired == 60
    res = store.series("a", ["cpu"], hour, hour + 60, 60)
    assert res.tier == "1m"
    assert res.metrics["cpu"].avg == pytest.approx([29.5])
    assert res.metrics["cpu"].max == [59.0]
