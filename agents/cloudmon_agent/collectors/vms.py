"""VMs through libvirt: one bulk ``getAllDomainStats`` call per cycle.

Two ways to the same calls, chosen by :func:`libvirt_module` per URI: a
local daemon (``qemu:///system``, ``qemu:///session``, ``DRIVER+unix:///...
?socket=``) is read through :mod:`~cloudmon_agent.collectors.virtrpc`, the
agent's own pure-Python client of libvirt's RPC protocol (about 0.3 MiB instead
of the 18 MiB ``import libvirt`` costs); every other URI (``test:///`` in
process, ``+ssh``, ``+tls``) through libvirt-python, the optional ``libvirt``
extra (:func:`libvirt_available`).  The connection is opened lazily;
when it cannot be opened or drops, the failure is logged once, retried with
capped exponential backoff (2 s ... 60 s) and the report carries no VMs
meanwhile -- the collector never raises out of :meth:`VmCollector.collect`.

Per domain: state, vCPUs, CPU % (of its vCPUs and of the host, from
``cpu.time`` deltas; 0 unless running), memory (``balloon.maximum``,
``balloon.current``, ``balloon.rss``, ``balloon.unused`` when the guest's
balloon driver gives it), disk and interface rates per device, and the PCI
addresses of assigned host devices (parsed from the domain XML only when the
set of domains changes).

Drivers whose bulk stats lack a group (libvirt's ``test:///`` driver returns
only ``state.*``) are filled from per-domain calls (``info``,
``memoryStats``, ``blockStats``, ``interfaceStats``) for the missing groups
only; real QEMU hosts never take that path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from cloudmon_agent.collectors.counters import KeyedRates
from cloudmon_agent.schema import Vm, VmDisk, VmNic

log = logging.getLogger(__name__)

DEFAULT_URI: Final = "qemu:///system"

#: virDomainState numbers -> names.
STATES: Final = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}
_RUNNING: Final = frozenset({1, 2})  # blocked = running but idle in the hypervisor's view
_RETRY_MIN: Final = 2.0
_RETRY_MAX: Final = 60.0


def libvirt_available() -> bool:
    """True when libvirt-python can be imported."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return True


def libvirt_module(uri: str) -> Any:
    """What speaks ``uri``: :mod:`~cloudmon_agent.collectors.virtrpc` for a local daemon's
    socket, else libvirt-python; None when neither can (libvirt-python is not installed)."""
    from cloudmon_agent.collectors import virtrpc

    if virtrpc.supports(uri):
        return virtrpc
    try:
        import libvirt
    except ImportError:
        return None
    return libvirt


def hostdev_pci_addresses(xml: str) -> list[str]:
    """PCI addresses (``0000:65:00.0``) of the ``<hostdev type='pci'>`` devices in a domain XML."""
    return parse_domain_xml(xml).hostdevs


class DomainXml(NamedTuple):
    """What the agent takes from a domain's XML (parsed only when the domain set or a state changes)."""

    hostdevs: list[str]
    disks: list[str]
    nics: list[str]
    #: Configured memory, current memory (KiB) and vCPUs: the figures of a guest that is not running.
    max_kib: int
    cur_kib: int
    vcpus: int


_NO_XML: Final = DomainXml([], [], [], 0, 0, 0)

#: libvirt memory units -> bytes per unit (times 1024 then // 1024 keeps KiB exact).
_UNIT_KIB: Final = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1 << 20, "M": 1 << 20,
                    "GiB": 1 << 30, "G": 1 << 30, "TiB": 1 << 40, "T": 1 << 40}  # fmt: skip
#: The top-level elements whose text is read (``<memory unit='KiB'>2097152</memory>``).
_NUMBERS: Final = ("memory", "currentMemory", "vcpu")


class _DomainXmlReader:
    """One pass of expat over a domain XML, keeping only what :class:`DomainXml` holds.

    expat directly, not ElementTree: the agent needs a dozen elements of the
    document, and ElementTree's module alone is ≈0.4 MiB of the agent's RSS.
    """

    def __init__(self) -> None:
        self.path: list[str] = []
        self.disks: list[str] = []
        self.nics: list[str] = []
        self.hostdevs: list[str] = []
        self.numbers: dict[str, tuple[str, list[str]]] = {}  # element -> (unit, text parts); first one wins
        self._iface: list[str] | None = None  # [target dev, mac address] of the open <interface>
        self._pci: bool | None = None  # the open <hostdev> is type='pci' and has no address yet

    def start(self, name: str, attrs: dict[str, str]) -> None:
        path = self.path
        path.append(name)
        depth = len(path)
        if depth == 2:
            if name in _NUMBERS and name not in self.numbers:
                self.numbers[name] = (attrs.get("unit", "KiB"), [])
            return
        if depth < 3 or path[1] != "devices":
            return
        kind = path[2]
        if depth == 3:
            if name == "interface":
                self._iface = ["", ""]
            elif name == "hostdev":
                self._pci = attrs.get("type") == "pci"
        elif depth == 4:
            if kind == "disk" and name == "target":
                self.disks.append(attrs.get("dev", ""))
            elif kind == "interface" and self._iface is not None:
                slot = {"target": (0, "dev"), "mac": (1, "address")}.get(name)
                if slot is not None and not self._iface[slot[0]]:
                    self._iface[slot[0]] = attrs.get(slot[1], "") or ""
        elif depth == 5 and kind == "hostdev" and path[3] == "source" and name == "address" and self._pci:
            self._pci = False  # the first address of the first source, as before
            try:
                dom, bus, slot_, fn = (
                    int(attrs.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")
                )
            except ValueError:
                return
            self.hostdevs.append(f"{dom:04x}:{bus:02x}:{slot_:02x}.{fn:x}")

    def end(self, name: str) -> None:
        if (
            len(self.path) == 3
            and self.path[1] == "devices"
            and name == "interface"
            and self._iface is not None
        ):
            target, mac = self._iface
            self.nics.append(target or mac)
            self._iface = None
        self.path.pop()

    def text(self, data: str) -> None:
        if len(self.path) == 2:
            entry = self.numbers.get(self.path[1])
            if entry is not None:
                entry[1].append(data)

    def number(self, name: str, scale_unit: bool) -> int:
        entry = self.numbers.get(name)
        if entry is None:
            return 0
        unit, parts = entry
        try:
            v = int("".join(parts).strip())
        except ValueError:
            return 0
        return v * _UNIT_KIB.get(unit, 1) // 1024 if scale_unit else v


def parse_domain_xml(xml: str) -> DomainXml:
    """Hostdev PCI addresses, disk and interface targets, memory and vCPUs of a domain XML."""
    import pyexpat

    reader = _DomainXmlReader()
    parser = pyexpat.ParserCreate()
    parser.buffer_text = True
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.text
    try:
        parser.Parse(xml, True)
    except pyexpat.ExpatError:
        return _NO_XML
    max_kib = reader.number("memory", True)
    return DomainXml(
        hostdevs=reader.hostdevs,
        disks=[d for d in reader.disks if d],
        nics=[n for n in reader.nics if n],
        max_kib=max_kib,
        cur_kib=reader.number("currentMemory", True) or max_kib,
        vcpus=reader.number("vcpu", False),
    )


class VmCollector:
    """Fills ``Report.vms`` from one libvirt connection."""

    field: str = "vms"

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        host_cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        libvirt = libvirt_module(uri)
        if libvirt is None:
            raise RuntimeError(
                f"libvirt-python is not installed: cannot open {uri} (install cloudmon-agent[libvirt])"
            )
        self._lv: Any = libvirt
        self.uri = uri
        self._clock = clock
        self._conn: Any = None
        self._host_cpus = host_cpus
        self._next_try = 0.0
        self._delay = _RETRY_MIN
        self._down_logged = False
        self._ever_connected = False
        self._cpu = KeyedRates()
        self._io = KeyedRates()
        # uuid -> what its XML says; rebuilt when the set of domains or of their states changes
        self._xml_cache: dict[str, DomainXml] = {}
        self._xml_key: frozenset[tuple[str, int]] = frozenset()
        self._flags = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        # libvirt prints every error to stderr by default; we log them ourselves.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.last_gpu_owners: dict[str, str] = {}

    # -- connection -----------------------------------------------------------
    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        now = self._clock()
        if now < self._next_try:
            return None
        try:
            conn = self._lv.openReadOnly(self.uri)
            if self._host_cpus is None:
                self._host_cpus = int(conn.getInfo()[2]) or 1
        except self._lv.libvirtError as exc:
            if self._use_libvirt_python(exc):
                return self._connect()
            if not self._down_logged:
                # Never connected yet (no libvirtd on this node is normal): info; lost it: warning.
                log.log(
                    logging.WARNING if self._ever_connected else logging.INFO,
                    "cannot connect to libvirt at %s (%s); no VMs reported, will retry "
                    '(libvirt_uri = "" turns VMs off)',
                    self.uri,
                    exc,
                )
                self._down_logged = True
            self._back_off()
            return None
        self._conn = conn
        return conn

    def _use_libvirt_python(self, exc: Exception) -> bool:
        """Switch from the agent's own client to libvirt-python where only it can authenticate."""
        from cloudmon_agent.collectors import virtrpc

        if self._lv is not virtrpc or getattr(exc, "code", None) != virtrpc.AUTH_REQUIRED:
            return False
        try:
            import libvirt
        except ImportError:
            return False
        log.info("libvirt at %s wants SASL: reading it through libvirt-python", self.uri)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self._lv = libvirt
        return True

    def _back_off(self) -> None:
        self._next_try = self._clock() + self._delay
        self._delay = min(self._delay * 2, _RETRY_MAX)

    def _drop(self, exc: Exception) -> None:
        # Logged once per outage: a daemon that accepts and then hangs is retried with a
        # growing delay (2 s ... 60 s), and only a good sample resets it.
        if not self._down_logged:
            log.warning("libvirt at %s failed (%s); no VMs reported, will reconnect", self.uri, exc)
            self._down_logged = True
        conn, self._conn = self._conn, None
        self._xml_key = frozenset()  # the XML cache may be incomplete: rebuild it on reconnect
        self._back_off()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- sampling ---------------------------------------------------------------
    def prime(self) -> None:
        """First reading of the CPU and I/O counters."""
        self.collect()

    def collect(self) -> list[Vm]:
        """One sample of every domain; an empty list while libvirt is unreachable (never raises)."""
        conn = self._connect()
        if conn is None:
            return []
        try:
            vms = self._sample(conn)
        except self._lv.libvirtError as exc:
            self._drop(exc)
            return []
        except Exception as exc:  # a malformed answer or a bug must not cost the report its host figures
            log.exception("reading VMs from libvirt at %s failed", self.uri)
            self._drop(exc)
            return []
        if self._down_logged and self._ever_connected:
            log.info("connected to libvirt at %s again", self.uri)
        self._down_logged = False
        self._ever_connected = True
        self._delay = _RETRY_MIN
        return vms

    def _sample(self, conn: Any) -> list[Vm]:
        stats = conn.getAllDomainStats(self._flags)
        now = self._clock()
        doms = [(dom.UUIDString(), dom, st) for dom, st in stats]
        key = frozenset((u, int(st.get("state.state", 0))) for u, _, st in doms)
        if key != self._xml_key and self._refresh_xml(doms):
            self._xml_key = key
        cpu_raw: dict[str, tuple[float]] = {}
        io_raw: dict[str, tuple[int, ...]] = {}
        rows: list[tuple[Any, str, dict[str, Any], list[str], list[str]]] = []
        filled = self._fill_missing(doms)
        for uuid, dom, st in doms:
            if uuid not in filled:
                continue
            try:
                name = dom.name()
            except self._lv.libvirtError as exc:  # vanished between the two calls
                log.debug("domain %s: %s", uuid, exc)
                continue
            st = filled[uuid]
            disks = self._disk_names(st, uuid)
            nics = self._nic_names(st, uuid)
            cpu_raw[uuid] = (float(st.get("cpu.time", 0)),)
            for i, d in enumerate(disks):
                io_raw[f"{uuid}/b/{d}"] = (
                    int(st.get(f"block.{i}.rd.bytes", 0)),
                    int(st.get(f"block.{i}.wr.bytes", 0)),
                    int(st.get(f"block.{i}.rd.reqs", 0)),
                    int(st.get(f"block.{i}.wr.reqs", 0)),
                )
            for i, n in enumerate(nics):
                io_raw[f"{uuid}/n/{n}"] = (
                    int(st.get(f"net.{i}.rx.bytes", 0)),
                    int(st.get(f"net.{i}.tx.bytes", 0)),
                    int(st.get(f"net.{i}.rx.pkts", 0)),
                    int(st.get(f"net.{i}.tx.pkts", 0)),
                )
            rows.append((uuid, name, st, disks, nics))
        cpu_rates = self._cpu.update(cpu_raw, now)
        io_rates = self._io.update(io_raw, now)
        host_cpus = self._host_cpus or 1
        out: list[Vm] = []
        owners: dict[str, str] = {}
        for uuid, name, st, disks, nics in rows:
            state = int(st.get("state.state", 0))
            vcpus = int(st.get("vcpu.current", 0))
            ns_per_s = (cpu_rates.get(uuid) or [0.0])[0]
            if state not in _RUNNING:
                # A paused or stopped guest uses no CPU (the test driver's counter runs on regardless).
                ns_per_s = 0.0
            cores = ns_per_s / 1e9
            hostdevs = self._xml_cache.get(uuid, _NO_XML).hostdevs
            for addr in hostdevs:
                owners[addr] = name
            out.append(
                Vm(
                    uuid=uuid,
                    name=name[:255],
                    state=STATES.get(state, "nostate"),
                    vcpus=vcpus,
                    cpu_percent=_pct(cores, vcpus),
                    host_cpu_percent=_pct(cores, host_cpus),
                    mem_max=int(st.get("balloon.maximum", 0)) * 1024,
                    mem_current=int(st.get("balloon.current", 0)) * 1024,
                    mem_rss=int(st["balloon.rss"]) * 1024 if "balloon.rss" in st else None,
                    mem_unused=int(st["balloon.unused"]) * 1024 if "balloon.unused" in st else None,
                    disks=[VmDisk(d[:255], *(io_rates.get(f"{uuid}/b/{d}") or [0.0] * 4)) for d in disks],
                    nics=[VmNic(n[:255], *(io_rates.get(f"{uuid}/n/{n}") or [0.0] * 4)) for n in nics],
                    hostdevs=list(hostdevs),
                )
            )
        self.last_gpu_owners = owners
        return out

    def gpu_owners(self) -> dict[str, str]:
        """PCI address -> VM name for host devices assigned to domains (as of the last collect)."""
        return self.last_gpu_owners

    def _refresh_xml(self, doms: list[tuple[str, Any, dict[str, Any]]]) -> bool:
        """Re-read every domain's XML; False if one failed (then it is tried again next time)."""
        cache: dict[str, DomainXml] = {}
        complete = True
        for uuid, dom, _ in doms:
            try:
                xml = dom.XMLDesc(0)
            except self._lv.libvirtError as exc:
                log.debug("XMLDesc of %s failed: %s", uuid, exc)
                complete = False
                continue
            cache[uuid] = parse_domain_xml(xml)
        self._xml_cache = cache
        return complete

    def _disk_names(self, st: dict[str, Any], uuid: str) -> list[str]:
        n = int(st.get("block.count", 0))
        if n:
            return [str(st.get(f"block.{i}.name", f"disk{i}")) for i in range(n)]
        return []

    def _nic_names(self, st: dict[str, Any], uuid: str) -> list[str]:
        n = int(st.get("net.count", 0))
        if n:
            return [str(st.get(f"net.{i}.name", f"net{i}")) for i in range(n)]
        return []

    def _fill_missing(self, doms: list[tuple[str, Any, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Each domain's stats, completed where the driver's bulk stats lack groups (the test driver).

        Real QEMU hosts never need a call here.  The per-domain calls of every domain
        go out together (:func:`virtrpc.batch <cloudmon_agent.collectors.virtrpc.batch>`
        pipelines them: one round trip instead of four per domain); a domain whose
        call fails (it vanished meanwhile) is left out of this sample.
        """
        plans: list[tuple[str, dict[str, Any], list[tuple[str, tuple[str, ...]]]]] = []
        calls: list[tuple[Any, str, tuple[str, ...]]] = []
        for uuid, dom, bulk in doms:
            st = dict(bulk)
            need = self._missing_calls(st, uuid)
            plans.append((uuid, st, need))
            calls += [(dom, what, args) for what, args in need]
        results = self._run_calls(calls) if calls else []
        out: dict[str, dict[str, Any]] = {}
        i = 0
        for uuid, st, need in plans:
            got = results[i : i + len(need)]
            i += len(need)
            failed = next((r for r in got if isinstance(r, self._lv.libvirtError)), None)
            if failed is not None:
                log.debug("domain %s: %s", uuid, failed)
                continue
            self._apply(st, need, got)
            out[uuid] = st
        return out

    def _missing_calls(self, st: dict[str, Any], uuid: str) -> list[tuple[str, tuple[str, ...]]]:
        running = int(st.get("state.state", 0)) in _RUNNING
        xml = self._xml_cache.get(uuid, _NO_XML)
        missing = "cpu.time" not in st or "balloon.maximum" not in st or "vcpu.current" not in st
        need: list[tuple[str, tuple[str, ...]]] = []
        if missing and not running and uuid in self._xml_cache:
            # A stopped guest: its configured figures, no call to libvirt (real QEMU hosts
            # often have many defined-but-off domains).
            st.setdefault("cpu.time", 0)
            st.setdefault("balloon.maximum", xml.max_kib)
            st.setdefault("balloon.current", xml.cur_kib)
            st.setdefault("vcpu.current", xml.vcpus)
        elif missing:
            need.append(("info", ()))
            if running and "balloon.rss" not in st:
                need.append(("memoryStats", ()))
        if "block.count" not in st and running and xml.disks:
            need += [("blockStats", (d,)) for d in xml.disks]
        if "net.count" not in st and running and xml.nics:
            need += [("interfaceStats", (n,)) for n in xml.nics]
        return need

    def _run_calls(self, calls: list[tuple[Any, str, tuple[str, ...]]]) -> list[Any]:
        batch = getattr(self._lv, "batch", None)
        if batch is not None:  # the agent's own RPC client: pipelined
            return list(batch(self._conn, calls))
        out: list[Any] = []
        for dom, what, args in calls:
            try:
                out.append(getattr(dom, what)(*args))
            except self._lv.libvirtError as exc:
                out.append(exc)
        return out

    @staticmethod
    def _apply(st: dict[str, Any], need: list[tuple[str, tuple[str, ...]]], got: list[Any]) -> None:
        disks: list[tuple[str, Any]] = []
        nics: list[tuple[str, Any]] = []
        for (what, args), r in zip(need, got, strict=True):
            if what == "info":
                state, max_kib, cur_kib, nvcpu, cpu_ns = r
                st.setdefault("state.state", state)
                st.setdefault("cpu.time", cpu_ns)
                st.setdefault("balloon.maximum", max_kib)
                st.setdefault("balloon.current", cur_kib)
                st.setdefault("vcpu.current", nvcpu)
            elif what == "memoryStats":
                for key in ("rss", "unused"):
                    if key in r:
                        st[f"balloon.{key}"] = r[key]
            elif what == "blockStats":
                disks.append((args[0], r))
            else:
                nics.append((args[0], r))
        if disks:
            st["block.count"] = len(disks)
            for i, (d, (rd_req, rd_b, wr_req, wr_b, _)) in enumerate(disks):
                st.update({f"block.{i}.name": d, f"block.{i}.rd.bytes": rd_b, f"block.{i}.wr.bytes": wr_b,
                           f"block.{i}.rd.reqs": rd_req, f"block.{i}.wr.reqs": wr_req})  # fmt: skip
        if nics:
            st["net.count"] = len(nics)
            for i, (n, (rx_b, rx_p, _, _, tx_b, tx_p, _, _)) in enumerate(nics):
                st.update({f"net.{i}.name": n, f"net.{i}.rx.bytes": rx_b, f"net.{i}.tx.bytes": tx_b,
                           f"net.{i}.rx.pkts": rx_p, f"net.{i}.tx.pkts": tx_p})  # fmt: skip

    def close(self) -> None:
        """Close the libvirt connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._lv.libvirtError):
                conn.close()


def _pct(cores: float, of: int) -> float:
    return min(100.0, max(0.0, 100.0 * cores / of)) if of > 0 else 0.0
