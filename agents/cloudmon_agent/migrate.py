"""Live migration of one libvirt domain to another host, with progress and a hard deadline.

:func:`migrate_vm` runs ``virDomainMigrateToURI3`` with ``LIVE | PEER2PEER |
PERSIST_DEST | UNDEFINE_SOURCE``: this host's libvirtd connects to the
destination's (``dest_uri``, the destination agent's advertised
``migrate_uri``), the guest keeps running while its memory is copied, the
destination keeps its definition and this host forgets it.  Without shared
storage the guest's disks must be read-only or absent (libvirt refuses a
writable local disk as unsafe).

The migration call blocks for the whole job, so it runs in a short-lived
thread while the calling thread polls ``jobStats`` (the second call path on
the same connection; libvirt connections are thread-safe) every ``poll_s``
seconds, hands the figures to ``progress`` and, past the deadline or when
``stop`` is set, calls ``abortJob``: the guest then keeps running on this host
and the error says so.  Nothing is retried here: the caller decides.

Needs libvirt-python (the ``libvirt`` extra), imported only when called.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

#: Seconds between two ``jobStats`` polls.
POLL_S: Final = 0.5
#: Seconds to wait for the migration call to return after ``abortJob``.
ABORT_GRACE_S: Final = 60.0

ProgressFn = Callable[[dict[str, float]], None]


class MigrationError(Exception):
    """The migration did not happen (or was aborted); the text says why and what to check."""


def migration_flags(lv: Any, live: bool = True) -> int:
    """``LIVE`` (when ``live``) ``| PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE``."""
    flags = int(lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_PERSIST_DEST | lv.VIR_MIGRATE_UNDEFINE_SOURCE)
    if live:
        flags |= int(lv.VIR_MIGRATE_LIVE)
    return flags


def _job_figures(lv: Any, stats: dict[str, Any]) -> dict[str, float]:
    """The figures of a ``jobStats`` answer worth showing: bytes, rate, elapsed time, percent."""
    keys = {
        "data_total": getattr(lv, "VIR_DOMAIN_JOB_DATA_TOTAL", "data_total"),
        "data_processed": getattr(lv, "VIR_DOMAIN_JOB_DATA_PROCESSED", "data_processed"),
        "data_remaining": getattr(lv, "VIR_DOMAIN_JOB_DATA_REMAINING", "data_remaining"),
        "memory_bps": getattr(lv, "VIR_DOMAIN_JOB_MEMORY_BPS", "memory_bps"),
        "memory_dirty_rate": getattr(lv, "VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE", "memory_dirty_rate"),
        "elapsed_ms": getattr(lv, "VIR_DOMAIN_JOB_TIME_ELAPSED", "time_elapsed"),
    }
    out: dict[str, float] = {}
    for name, key in keys.items():
        value = stats.get(key)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    total = out.get("data_total", 0.0)
    if total > 0 and "data_processed" in out:
        out["percent"] = min(100.0, 100.0 * out["data_processed"] / total)
    return out


def _error_text(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    msg = get() if callable(get) else None
    return str(msg or exc)


def migrate_vm(
    conn: Any,
    name: str,
    dest_uri: str,
    timeout_s: float,
    live: bool = True,
    *,
    data_uri: str | None = None,
    bandwidth_mib: int | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    poll_s: float = POLL_S,
) -> dict[str, float]:
    """Migrate domain ``name`` from ``conn``'s host to ``dest_uri``; returns the last figures.

    Raises :class:`MigrationError` when the domain is missing or not running
    (for a live migration), when libvirt refuses or fails the migration, and
    when it did not finish within ``timeout_s`` (it is then aborted and the
    guest keeps running here).  ``progress`` gets the ``jobStats`` figures
    (``data_total``, ``data_processed``, ``data_remaining``, ``memory_bps``,
    ``elapsed_ms``, ``percent``) while the job runs.
    """
    import libvirt as lv

    from cloudmon_agent.vmops import VmOpError, check_uri

    try:
        check_uri(dest_uri)
    except VmOpError as exc:
        raise MigrationError(str(exc)) from None
    if timeout_s <= 0:
        raise MigrationError(f"no time left to migrate {name} (timeout {timeout_s:g} s)")
    try:
        dom = conn.lookupByName(name)
    except lv.libvirtError as exc:
        if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            raise MigrationError(f"there is no VM named {name!r} on this host") from None
        raise MigrationError(f"cannot look up VM {name!r}: {_error_text(exc)}") from None
    try:
        active = bool(dom.isActive())
    except lv.libvirtError as exc:
        raise MigrationError(f"cannot read the state of VM {name!r}: {_error_text(exc)}") from None
    if live and not active:
        raise MigrationError(
            f"VM {name!r} is not running; a live migration needs a running VM (start it first)"
        )
    params: dict[str, Any] = {}
    if data_uri:
        params[lv.VIR_MIGRATE_PARAM_URI] = data_uri
    if bandwidth_mib:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    flags = migration_flags(lv, live)

    failure: list[BaseException] = []

    def run() -> None:
        try:
            dom.migrateToURI3(dest_uri, params, flags)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises
            failure.append(exc)

    started = time.monotonic()
    deadline = started + timeout_s
    worker = threading.Thread(target=run, name=f"cloudmon-migrate-{name}"[:60], daemon=True)
    worker.start()
    figures: dict[str, float] = {}
    aborted: str | None = None
    abort_at = 0.0
    while True:
        worker.join(poll_s)
        if not worker.is_alive():
            break
        try:
            stats = dom.jobStats()
        except lv.libvirtError:
            stats = {}  # the job is just starting or ending: nothing to show this time
        if stats:
            figures = _job_figures(lv, stats) or figures
            if progress is not None:
                progress(dict(figures))
        now = time.monotonic()
        if aborted is None and (now >= deadline or (stop is not None and stop.is_set())):
            aborted = f"did not finish within {timeout_s:g} s" if now >= deadline else "the agent is stopping"
            abort_at = now
            log.warning("migration of %s to %s: %s; aborting it", name, dest_uri, aborted)
            try:
                dom.abortJob()
            except lv.libvirtError as exc:
                log.warning("abortJob of %s failed: %s", name, _error_text(exc))
        if aborted is not None and now - abort_at > ABORT_GRACE_S:
            raise MigrationError(
                f"migration of {name} to {dest_uri} {aborted} and still had not stopped "
                f"{ABORT_GRACE_S:.0f} s after it was aborted; check the VM on both hosts"
            )
    elapsed = time.monotonic() - started
    figures["elapsed_s"] = elapsed
    if failure:
        error = failure[0]
        done = _progress_text(figures)
        if aborted is not None:
            raise MigrationError(
                f"migration of {name} to {dest_uri} {aborted} ({done}); it was aborted and the VM keeps "
                "running on this host"
            )
        raise MigrationError(
            f"migration of {name} to {dest_uri} failed after {elapsed:.1f} s: {_error_text(error)}"
        )
    # The last poll saw the job mid-way: keep only what stays true once it is done.
    for mid_job in ("data_processed", "data_remaining", "memory_bps", "memory_dirty_rate", "elapsed_ms"):
        figures.pop(mid_job, None)
    figures["percent"] = 100.0
    if progress is not None:
        progress(dict(figures))
    log.info("migrated %s to %s in %.1f s", name, dest_uri, elapsed)
    return figures


def _progress_text(figures: dict[str, float]) -> str:
    if "data_processed" in figures and figures.get("data_total"):
        mib = 1 << 20
        return (
            f"{figures['data_processed'] / mib:.0f} of {figures['data_total'] / mib:.0f} MiB copied "
            f"in {figures.get('elapsed_s', 0.0):.1f} s"
        )
    return f"after {figures.get('elapsed_s', 0.0):.1f} s"


__all__ = ["MigrationError", "migrate_vm", "migration_flags"]
