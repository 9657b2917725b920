"""Instances as libvirt VMs on a set of hosts, reached directly over libvirt URIs.

Options (a launch template's ``options`` for provider ``libvirt``)::

    hosts = {h1 = "qemu+ssh://root@h1/system", h2 = "qemu+tcp://10.0.0.2/system"}
    template_xml = "/var/lib/cloudmon/web.xml"   # a template domain XML on the hosts, or
    base_image = "/var/lib/images/debian.qcow2"  # a base image cloned copy-on-write ...
    overlay_dir = "/var/lib/cloudmon/overlays"   # ... into this directory (on the hosts)
    base_format = "qcow2"        domain_type = "kvm"     network = "default"
    kernel / initrd / cmdline    (optional direct kernel boot)
    call_timeout_s = 30          # every libvirt call (listing, state, capacity)
    create_timeout_s = 120       # create (qemu-img + define + start)
    stop_timeout_s = 30          # graceful shutdown before destroy on delete
    cpu_allocation_ratio = 1.0   memory_headroom_mib = 0

A :class:`LaunchRequest`'s ``image`` overrides the template (a path ending in
``.xml``) or the base image (anything else); its ``params`` may override any of
the VM fields above and may restrict placement with ``hosts = [...]``.

The instance id is the VM's name (names are unique per group, and a name
survives live migration where a host-qualified id would not): ``describe``
lists cloudmon's VMs on every host, so an instance that the rebalancer moved is
still found.  VM operations are the agent's own :mod:`cloudmon_agent.vmops`, so
acting through an agent or directly over a URI does the same thing.

Every libvirt call runs on the host's own worker thread and is time-limited:
a host that stops answering costs its caller ``call_timeout_s``, not a hang,
and its stuck connection is abandoned (a fresh one is opened next time).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from cloudmon.providers.base import InstanceInfo, InstanceState, LaunchRequest, ProviderError
from cloudmon.providers.placement import HostCapacity, place
from cloudmon_agent import vmops
from cloudmon_agent.vmops import VmOpError, VmSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
_SPEC_FIELDS: Final = (
    "base_image",
    "base_format",
    "overlay_dir",
    "template_xml",
    "domain_type",
    "network",
    "kernel",
    "initrd",
    "cmdline",
)
_STATE: Final = {
    "running": InstanceState.RUNNING,
    "blocked": InstanceState.RUNNING,
    "nostate": InstanceState.PENDING,
    vmops.MISSING: InstanceState.MISSING,
}
_JOIN_S: Final = 5.0


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise ProviderError(
            "the libvirt provider needs libvirt-python: pip install libvirt-python (Debian: libvirt-dev to build it)"
        ) from None
    return libvirt


class HostWorker:
    """One libvirt host: its connection, used only from this worker's thread.

    :meth:`call` runs ``fn(conn)`` there and waits at most ``timeout`` seconds.
    A call that overruns abandons the worker: its thread ends (and closes its
    connection) whenever the stuck call returns, and the owner makes a new one.
    """

    def __init__(self, host: str, uri: str) -> None:
        self.host = host
        self.uri = uri
        self.abandoned = False
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], Any], concurrent.futures.Future[Any]] | None]
        self._queue = queue.SimpleQueue()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name=f"libvirt-{host}", daemon=True)
        self._thread.start()

    def _open(self) -> Any:
        libvirt = _libvirt()
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise ProviderError(
                f"cannot connect to libvirt host {self.host} at {self.uri}: {exc}; check that libvirtd runs "
                f"there and the URI is right (virsh -c {self.uri} list)"
            ) from None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if self._conn is None:
                    self._conn = self._open()
                fut.set_result(fn(self._conn))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)
                self._drop_if_dead()
        self._close_conn()

    def _drop_if_dead(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            alive = bool(conn.isAlive())
        except Exception:  # noqa: BLE001 - a broken connection may fail in any way
            alive = False
        if not alive:
            self._close_conn()

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing libvirt connection to %s failed", self.host, exc_info=True)

    def call(self, fn: Callable[[Any], T], timeout: float, what: str) -> T:
        """``fn(conn)`` on this host's thread, or :class:`ProviderError` after ``timeout`` s."""
        if self.abandoned:
            raise ProviderError(f"libvirt host {self.host}: worker closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, fut))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if not fut.cancel():
                self.close(wait=False)
            raise ProviderError(
                f"libvirt host {self.host} ({self.uri}) did not answer {what} within {timeout:g} s; "
                "check that the host and its libvirtd are responsive, or raise call_timeout_s"
            ) from None

    def close(self, wait: bool = True) -> None:
        """End the thread (after the call in progress) and close the connection."""
        if not self.abandoned:
            self.abandoned = True
            self._queue.put(None)
        if wait:
            self._thread.join(_JOIN_S)
            if self._thread.is_alive():
                log.warning(
                    "libvirt host %s: a call is still stuck after close; leaving its thread", self.host
                )

    def alive(self) -> bool:
        return self._thread.is_alive()


def _float(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ProviderError(f"libvirt provider option {key} must be a number, got {value!r}") from None
    if out <= 0 and key.endswith("timeout_s"):
        raise ProviderError(f"libvirt provider option {key} must be > 0, got {value!r}")
    return out


class LibvirtProvider:
    """Creates instances as VMs on libvirt hosts picked by placement (see the module doc)."""

    name = "libvirt"

    def __init__(self, options: Mapping[str, Any], clock: Callable[[], float] = time.time) -> None:
        hosts = options.get("hosts")
        if not isinstance(hosts, Mapping) or not hosts:
            raise ProviderError(
                "the libvirt provider needs hosts = {NAME = LIBVIRT_URI, ...} in its options "
                '(e.g. hosts = {h1 = "qemu+ssh://root@h1/system"})'
            )
        self._uris = {str(k): str(v) for k, v in hosts.items()}
        self._options = dict(options)
        self._clock = clock
        self.call_timeout_s = _float(options, "call_timeout_s", 30.0)
        self.create_timeout_s = _float(options, "create_timeout_s", 120.0)
        self.stop_timeout_s = _float(options, "stop_timeout_s", 30.0)
        self.cpu_allocation_ratio = _float(options, "cpu_allocation_ratio", 1.0)
        self.memory_headroom_mib = _float(options, "memory_headroom_mib", 0.0)
        self._lock = threading.Lock()
        self._workers: dict[str, HostWorker] = {}
        self._created: dict[str, float] = {}
        self._where: dict[str, str] = {}
        self._closed = False
        _libvirt().registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions

    # -- plumbing -----------------------------------------------------------------------

    def _worker(self, host: str) -> HostWorker:
        with self._lock:
            if self._closed:
                raise ProviderError("the libvirt provider is closed")
            w = self._workers.get(host)
            if w is None or w.abandoned:
                w = self._workers[host] = HostWorker(host, self._uris[host])
            return w

    def _call(self, host: str, fn: Callable[[Any], T], what: str, timeout: float | None = None) -> T:
        libvirt = _libvirt()
        try:
            return self._worker(host).call(fn, timeout or self.call_timeout_s, what)
        except VmOpError as exc:
            raise ProviderError(f"libvirt host {host}: {exc}") from None
        except libvirt.libvirtError as exc:  # from calls outside vmops
            raise ProviderError(f"libvirt host {host} ({self._uris[host]}): {what} failed: {exc}") from None

    def _scan(
        self, hosts: list[str]
    ) -> tuple[dict[str, tuple[str, str, vmops.CloudmonMeta]], dict[str, str]]:
        """cloudmon's VMs on ``hosts``: ``name -> (host, state, meta)``, and ``host -> error``."""
        found: dict[str, tuple[str, str, vmops.CloudmonMeta]] = {}
        failed: dict[str, str] = {}
        for host in hosts:
            try:
                doms = self._call(host, vmops.cloudmon_domains, "the VM listing")
            except ProviderError as exc:
                failed[host] = str(exc)
                continue
            for name, (state, meta) in doms.items():
                found[name] = (host, state, meta)
        return found, failed

    def _spec(self, request: LaunchRequest) -> VmSpec:
        fields: dict[str, Any] = {k: self._options[k] for k in _SPEC_FIELDS if k in self._options}
        if request.image:
            key = "template_xml" if request.image.endswith(".xml") else "base_image"
            fields.pop("template_xml", None)
            fields.pop("base_image", None)
            fields[key] = request.image
        fields.update({k: v for k, v in request.params.items() if k in _SPEC_FIELDS})
        return VmSpec(
            name=request.name,
            vcpus=request.vcpus,
            memory_mib=request.memory_mib,
            group=request.group,
            **fields,
        )

    # -- Provider -----------------------------------------------------------------------

    def hosts(self) -> Mapping[str, Mapping[str, float]]:
        """Capacity of every reachable host (unreachable ones are logged and left out)."""
        out: dict[str, Mapping[str, float]] = {}
        for host in self._uris:
            try:
                out[host] = self._call(host, vmops.host_capacity, "the capacity query")
            except ProviderError as exc:
                log.warning("libvirt provider: %s", exc)
        return out

    def place(self, request: LaunchRequest) -> str:
        """The host a new instance of ``request`` goes to (raises :class:`PlacementError`)."""
        allowed_param = request.params.get("hosts")
        allowed = [str(h) for h in allowed_param] if isinstance(allowed_param, list) else list(self._uris)
        unknown = [h for h in allowed if h not in self._uris]
        if unknown:
            raise ProviderError(
                f"launch template names unknown libvirt hosts {unknown}; known: {sorted(self._uris)}"
            )
        found, _failed = self._scan(allowed)
        per_host: dict[str, int] = {}
        for host, _state, meta in found.values():
            if meta.group == request.group:
                per_host[host] = per_host.get(host, 0) + 1
        caps: list[HostCapacity] = []
        for host in allowed:
            try:
                figures = self._call(host, vmops.host_capacity, "the capacity query")
            except ProviderError as exc:
                log.warning("libvirt provider: placement skips %s: %s", host, exc)
                continue
            caps.append(HostCapacity.from_figures(host, figures, per_host.get(host, 0)))
        return place(
            caps,
            request.vcpus,
            request.memory_mib,
            cpu_allocation_ratio=self.cpu_allocation_ratio,
            memory_headroom_mib=self.memory_headroom_mib,
            what=f"instance {request.name} of group {request.group}",
        )

    def create(self, request: LaunchRequest) -> InstanceInfo:
        """Place, define and start one VM; returns once libvirt runs it (the guest may still boot)."""
        host = request.host or self.place(request)
        if host not in self._uris:
            raise ProviderError(f"unknown libvirt host {host!r}; known: {sorted(self._uris)}")
        spec = self._spec(request)

        def create(conn: Any) -> str:
            vmops.create_vm(conn, spec)
            return vmops.vm_state(conn, spec.name)

        state = self._call(host, create, f"the creation of VM {spec.name}", self.create_timeout_s)
        created = self._clock()
        with self._lock:
            self._created[spec.name] = created
            self._where[spec.name] = host
        log.info(
            "libvirt provider: created VM %s of group %s on %s (%s)", spec.name, request.group, host, state
        )
        return InstanceInfo(
            id=spec.name,
            group=request.group,
            state=_STATE.get(state, InstanceState.STOPPED),
            host=host,
            created=created,
        )

    def delete(self, instance_id: str) -> None:
        """Stop (gracefully, then destroy) and delete the VM wherever it is; missing is fine."""
        with self._lock:
            hint = self._where.get(instance_id)
        hosts = [hint] if hint is not None else []
        hosts += [h for h in self._uris if h != hint]
        stop_s = self.stop_timeout_s

        def delete(conn: Any) -> bool:
            if vmops.vm_state(conn, instance_id) == vmops.MISSING:
                return False
            vmops.stop_vm(conn, instance_id, timeout_s=stop_s, force=True)
            vmops.delete_vm(conn, instance_id)
            return True

        errors: list[str] = []
        for host in hosts:
            try:
                if self._call(
                    host, delete, f"the deletion of VM {instance_id}", stop_s + self.call_timeout_s
                ):
                    log.info("libvirt provider: deleted VM %s on %s", instance_id, host)
                    break
            except ProviderError as exc:
                errors.append(str(exc))
        else:
            if errors:
                raise ProviderError(f"could not delete VM {instance_id}: " + "; ".join(errors))
        with self._lock:
            self._where.pop(instance_id, None)
            self._created.pop(instance_id, None)

    def describe(self, instance_ids: list[str]) -> dict[str, InstanceInfo]:
        """State of the given VMs, looked up on every host (they may have been migrated)."""
        found, failed = self._scan(list(self._uris))
        out: dict[str, InstanceInfo] = {}
        unknown: list[str] = []
        for iid in instance_ids:
            hit = found.get(iid)
            with self._lock:
                created = self._created.get(iid, 0.0)
                if hit is not None:
                    self._where[iid] = hit[0]
            if hit is None:
                if failed:
                    unknown.append(iid)
                out[iid] = InstanceInfo(id=iid, group="", state=InstanceState.MISSING, created=created)
                continue
            host, state, meta = hit
            out[iid] = InstanceInfo(
                id=iid,
                group=meta.group,
                state=_STATE.get(state, InstanceState.STOPPED),
                host=host,
                created=created,
            )
        if unknown:
            raise ProviderError(
                f"cannot tell whether {', '.join(unknown)} still exist: "
                + "; ".join(f"{h}: {e}" for h, e in sorted(failed.items()))
            )
        return out

    def close(self) -> None:
        """Close every host's connection and worker thread (idempotent)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.close()
