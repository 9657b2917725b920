"""libvirt VM lifecycle as plain functions over an open libvirt connection.

The agent's executor runs these as typed, allow-listed actions; the collector's
libvirt provider calls the same functions over a remote URI.  Nothing here
opens or closes connections, and nothing keeps state between calls: what a
later call needs (the copy-on-write overlay a VM was created with, the group it
belongs to) is written into the domain's own XML as cloudmon metadata, so it
survives restarts of the agent and live migration.

- :func:`create_vm` defines (and by default starts) a VM from a :class:`VmSpec`:
  a base image, cloned as a qcow2 overlay (``qemu-img create -f qcow2 -F FMT -b
  BASE``) in an overlay directory, and/or a template domain XML whose name,
  uuid, memory and vCPUs are rewritten.  Creating a VM that cloudmon already
  created under that name is a no-op (retries are safe).
- :func:`start_vm`, :func:`stop_vm` (graceful shutdown, then destroy),
  :func:`delete_vm` (destroy, undefine, remove the overlay; missing is fine),
  :func:`vm_state`, :func:`host_capacity`, :func:`cloudmon_domains`.

Every failure raises :class:`VmOpError` whose text says what failed and what to
do.  libvirt is imported lazily: the agent runs without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

# virDomainState numbers -> names, as the agent's VM collector reports them.
from cloudmon_agent.collectors.vms import STATES
from cloudmon_agent.wire import Struct

#: XML namespace of the metadata cloudmon writes into the domains it creates.
METADATA_NS: Final = "https://cloudmon.dev/xmlns/instance/1"
_METADATA_KEY: Final = "cm"

MISSING: Final = "missing"
_ACTIVE_STATES: Final = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
_QEMU_IMG_TIMEOUT_S: Final = 60.0
_VIR_ERR_NO_DOMAIN: Final = 42
_VIR_ERR_OPERATION_INVALID: Final = 55
_VIR_ERR_INVALID_ARG: Final = 8
_VIR_ERR_NO_SUPPORT: Final = 3


class VmOpError(Exception):
    """A VM operation failed; the text says which VM, what failed and what to do."""


def check_uri(uri: str) -> str:
    """Refuse libvirt URIs that make the client run a program or reach through one.

    libvirt's ``ext`` transport runs ``?command=``; ``?netcat=`` and ``?proxy=`` pick
    the program run on the far side.  A URI comes from the collector's users (group
    templates, migration destinations), so none of these is taken: configure such
    transports in libvirt's own client config instead.  Returns ``uri``.
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if "+ext" in parts.scheme or {"command", "netcat", "proxy"} & set(parse_qs(parts.query)):
        raise VmOpError(
            f"libvirt URI {uri!r} would run a program (ext transport, command=, netcat= or proxy=); "
            "use qemu+tls://, qemu+tcp:// or a plain qemu+ssh:// URI"
        )
    return uri


class VmSpec(Struct, frozen=True, kw_only=True):
    """What :func:`create_vm` builds.

    Give ``base_image`` (cloned copy-on-write into ``overlay_dir``) or
    ``template_xml`` (a domain XML file used as the template), or both (the
    template's first disk then points at the overlay).
    """

    name: str
    vcpus: int = 1
    memory_mib: int = 512
    #: Path of the base disk image on the host; the VM gets a qcow2 overlay on it.
    base_image: str | None = None
    #: Format of the base image (``qemu-img -F``).
    base_format: str = "qcow2"
    #: Directory (on the host) where overlays are created; required with ``base_image``.
    overlay_dir: str | None = None
    #: Path of a template domain XML (on the host).
    template_xml: str | None = None
    #: Domain type of a VM built without a template: ``kvm``, or ``qemu`` for TCG.
    domain_type: str = "kvm"
    #: libvirt network for a NIC of a VM built without a template (no NIC when unset).
    network: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    #: Auto-scaling group the VM belongs to (recorded in its metadata).
    group: str = ""
    start: bool = True


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise VmOpError(
            "libvirt-python is not installed: install the agent's libvirt extra "
            "(pip install 'cloudmon-agent[libvirt]')"
        ) from None
    return libvirt


def _host(conn: Any) -> str:
    try:
        return str(conn.getURI())
    except Exception:  # noqa: BLE001 - only for the message
        return "the libvirt host"


def _lookup(conn: Any, name: str) -> Any | None:
    """The domain called ``name``, or ``None`` when it does not exist."""
    libvirt = _libvirt()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
            return None
        raise VmOpError(f"cannot look up VM {name!r} on {_host(conn)}: {exc}") from None


def _state(dom: Any) -> str:
    return STATES.get(int(dom.state()[0]), "nostate")


def vm_state(conn: Any, name: str) -> str:
    """``running``, ``blocked``, ``paused``, ``shutdown``, ``shutoff``, ``crashed``,
    ``pmsuspended``, ``nostate``, or ``missing`` when no such domain is defined."""
    dom = _lookup(conn, name)
    if dom is None:
        return MISSING
    try:
        return _state(dom)
    except _libvirt().libvirtError as exc:
        if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
            return MISSING
        raise VmOpError(f"cannot read the state of VM {name!r} on {_host(conn)}: {exc}") from None


# -- metadata -------------------------------------------------------------------------


class CloudmonMeta(Struct, frozen=True):
    """What cloudmon recorded in a domain it created."""

    group: str = ""
    overlay: str | None = None


def _meta_xml(meta: CloudmonMeta) -> ET.Element:
    el = ET.Element(f"{{{METADATA_NS}}}instance", {"group": meta.group})
    if meta.overlay:
        ET.SubElement(el, f"{{{METADATA_NS}}}overlay").text = meta.overlay
    return el


def _parse_meta(xml: str) -> CloudmonMeta | None:
    """The cloudmon metadata of a domain XML (``None`` when cloudmon did not create it)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    el = root.find(f"./metadata/{{{METADATA_NS}}}instance")
    if el is None:
        return None
    ov = el.find(f"{{{METADATA_NS}}}overlay")
    return CloudmonMeta(group=el.get("group", ""), overlay=(ov.text or None) if ov is not None else None)


def domain_meta(conn: Any, name: str) -> CloudmonMeta | None:
    """cloudmon's metadata of VM ``name`` (``None`` when missing or not created by cloudmon)."""
    dom = _lookup(conn, name)
    if dom is None:
        return None
    try:
        return _parse_meta(dom.XMLDesc(0))
    except _libvirt().libvirtError as exc:
        raise VmOpError(f"cannot read the XML of VM {name!r} on {_host(conn)}: {exc}") from None


def cloudmon_domains(conn: Any) -> dict[str, tuple[str, CloudmonMeta]]:
    """Every domain cloudmon created on this host: ``name -> (state, metadata)``."""
    libvirt = _libvirt()
    out: dict[str, tuple[str, CloudmonMeta]] = {}
    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise VmOpError(f"cannot list VMs on {_host(conn)}: {exc}") from None
    for dom in doms:
        try:
            meta = _parse_meta(dom.XMLDesc(0))
            if meta is not None:
                out[dom.name()] = (_state(dom), meta)
        except libvirt.libvirtError as exc:
            # Undefined between the listing and this call: it is gone, not an error.
            if exc.get_error_code() != _VIR_ERR_NO_DOMAIN:
                raise VmOpError(f"cannot read VM {dom.name()!r} on {_host(conn)}: {exc}") from None
    return out


# -- domain XML -------------------------------------------------------------------------


def _set_text(parent: ET.Element, tag: str, text: str, attrs: dict[str, str] | None = None) -> ET.Element:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text
    el.attrib.clear()
    el.attrib.update(attrs or {})
    return el


def _boot(root: ET.Element, spec: VmSpec) -> None:
    os_el = root.find("os")
    if os_el is None:
        os_el = ET.SubElement(root, "os")
    if os_el.find("type") is None:
        ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
    for tag, value in (("kernel", spec.kernel), ("initrd", spec.initrd), ("cmdline", spec.cmdline)):
        if value is not None:
            _set_text(os_el, tag, value)


def _overlay_disk(root: ET.Element, overlay: str) -> None:
    """Point the template's first disk at ``overlay`` (or add a virtio disk)."""
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    disk = next((d for d in devices.iterfind("disk") if d.get("device", "disk") == "disk"), None)
    if disk is None:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    disk.set("type", "file")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.SubElement(disk, "driver")
    driver.set("name", "qemu")
    driver.set("type", "qcow2")
    source = disk.find("source")
    if source is None:
        source = ET.SubElement(disk, "source")
    source.attrib.clear()
    source.set("file", overlay)
    ro = disk.find("readonly")
    if ro is not None:
        disk.remove(ro)  # an overlay exists to be written


def build_domain_xml(spec: VmSpec, overlay: str | None, template: str | None = None) -> str:
    """The domain XML :func:`create_vm` defines from ``spec`` and a template's text (pure)."""
    if template is not None:
        try:
            root = ET.fromstring(template)
        except ET.ParseError as exc:
            raise VmOpError(f"template domain XML {spec.template_xml} is not valid XML: {exc}") from None
        if root.tag != "domain":
            raise VmOpError(f"template {spec.template_xml} is not a domain XML (root <{root.tag}>)")
        # A clone must not share identity with its template (as virt-clone does).
        for tag in ("uuid", "metadata"):
            for el in root.findall(tag):
                root.remove(el)
        for iface in root.iterfind("./devices/interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    else:
        root = ET.Element("domain", {"type": spec.domain_type})
        ET.SubElement(root, "clock", {"offset": "utc"})
        devices = ET.SubElement(root, "devices")
        if spec.network:
            nic = ET.SubElement(devices, "interface", {"type": "network"})
            ET.SubElement(nic, "source", {"network": spec.network})
            ET.SubElement(nic, "model", {"type": "virtio"})
    _set_text(root, "name", spec.name)
    _set_text(root, "memory", str(spec.memory_mib), {"unit": "MiB"})
    _set_text(root, "currentMemory", str(spec.memory_mib), {"unit": "MiB"})
    _set_text(root, "vcpu", str(spec.vcpus))
    _boot(root, spec)
    if overlay is not None:
        _overlay_disk(root, overlay)
    ET.register_namespace(_METADATA_KEY, METADATA_NS)
    metadata = ET.SubElement(root, "metadata")
    metadata.append(_meta_xml(CloudmonMeta(group=spec.group, overlay=overlay)))
    return ET.tostring(root, encoding="unicode")


# -- lifecycle --------------------------------------------------------------------------


def _check_spec(spec: VmSpec) -> None:
    if not spec.name or "/" in spec.name:
        raise VmOpError(f"invalid VM name {spec.name!r}: give a non-empty name without '/'")
    if spec.vcpus < 1 or spec.memory_mib < 16:
        raise VmOpError(
            f"VM {spec.name!r}: vcpus must be >= 1 and memory_mib >= 16 (got {spec.vcpus}, {spec.memory_mib})"
        )
    if spec.base_image is None and spec.template_xml is None:
        raise VmOpError(f"VM {spec.name!r}: give base_image (a disk image to clone) or template_xml")
    if spec.base_image is not None and not spec.overlay_dir:
        raise VmOpError(
            f"VM {spec.name!r}: base_image needs overlay_dir, the directory where its "
            "copy-on-write overlay is created"
        )


def _create_overlay(spec: VmSpec) -> str:
    assert spec.base_image is not None
    assert spec.overlay_dir is not None
    base = Path(spec.base_image)
    if not base.is_file():
        raise VmOpError(f"VM {spec.name!r}: base image {base} does not exist on this host")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise VmOpError("qemu-img is not installed on this host (Debian: apt-get install qemu-utils)")
    directory = Path(spec.overlay_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VmOpError(f"cannot create overlay directory {directory}: {exc.strerror}") from None
    overlay = directory / f"{spec.name}.qcow2"
    if overlay.exists():
        raise VmOpError(
            f"VM {spec.name!r}: overlay {overlay} already exists but no VM uses it; "
            "remove the file if it is stale, or choose another name"
        )
    args = [
        qemu_img,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        spec.base_format,
        "-b",
        str(base.resolve()),
        str(overlay),
    ]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=_QEMU_IMG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            overlay.unlink()
        raise VmOpError(f"qemu-img did not create {overlay} within {_QEMU_IMG_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            overlay.unlink()
        raise VmOpError(
            f"qemu-img could not create overlay {overlay} on {base} (format {spec.base_format}): "
            f"{proc.stderr.strip()[:500]}"
        )
    return str(overlay)


def _remove_overlay(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def create_vm(conn: Any, spec: VmSpec) -> str:
    """Define (and, with ``spec.start``, start) a VM; returns its UUID.

    If cloudmon already created a VM with this name, nothing new is built: it is
    started when ``spec.start`` and its UUID returned (a retried create is
    harmless).  A name taken by a VM cloudmon did not create is an error.  On
    failure nothing is left behind (the overlay is removed, the VM undefined).
    """
    libvirt = _libvirt()
    _check_spec(spec)
    existing = _lookup(conn, spec.name)
    if existing is not None:
        if _parse_meta(existing.XMLDesc(0)) is None:
            raise VmOpError(
                f"a VM named {spec.name!r} already exists on {_host(conn)} and was not created by "
                "cloudmon; choose another name"
            )
        if spec.start and _state(existing) not in _ACTIVE_STATES:
            start_vm(conn, spec.name)
        return str(existing.UUIDString())
    template: str | None = None
    if spec.template_xml is not None:
        try:
            template = Path(spec.template_xml).read_text(encoding="utf-8")
        except OSError as exc:
            raise VmOpError(f"cannot read template domain XML {spec.template_xml}: {exc.strerror}") from None
    xml = build_domain_xml(spec, None, template)  # validates the template before any file is made
    overlay = _create_overlay(spec) if spec.base_image is not None else None
    if overlay is not None:
        xml = build_domain_xml(spec, overlay, template)
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        _remove_overlay(overlay)
        raise VmOpError(f"libvirt on {_host(conn)} refused to define VM {spec.name!r}: {exc}") from None
    if spec.start:
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            _remove_overlay(overlay)
            raise VmOpError(
                f"VM {spec.name!r} was defined on {_host(conn)} but did not start (so it was removed "
                f"again): {exc}"
            ) from None
    return str(dom.UUIDString())


def start_vm(conn: Any, name: str) -> None:
    """Start a defined VM; a VM that is already running is left as it is."""
    libvirt = _libvirt()
    dom = _lookup(conn, name)
    if dom is None:
        raise VmOpError(f"cannot start VM {name!r}: it is not defined on {_host(conn)}")
    state = _state(dom)
    if state in ("running", "blocked"):
        return
    try:
        if state == "paused":
            dom.resume()
        else:
            dom.create()
    except libvirt.libvirtError as exc:
        raise VmOpError(f"VM {name!r} on {_host(conn)} did not start: {exc}") from None


def _poll(until: Callable[[], bool], timeout_s: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if until():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(step, left))


def stop_vm(conn: Any, name: str, timeout_s: float = 60.0, force: bool = True) -> None:
    """Shut a VM down gracefully (ACPI); after ``timeout_s``, destroy it when ``force``.

    A VM that is already shut off is left as it is; a missing one is an error.
    """
    libvirt = _libvirt()
    dom = _lookup(conn, name)
    if dom is None:
        raise VmOpError(f"cannot stop VM {name!r}: it is not defined on {_host(conn)}")
    if _state(dom) not in _ACTIVE_STATES:
        return
    try:
        dom.shutdown()
    except libvirt.libvirtError as exc:
        if not force:
            raise VmOpError(f"VM {name!r} on {_host(conn)} refused a graceful shutdown: {exc}") from None
    if _poll(lambda: vm_state(conn, name) not in _ACTIVE_STATES, timeout_s):
        return
    if not force:
        raise VmOpError(
            f"VM {name!r} on {_host(conn)} did not shut down within {timeout_s:g} s; "
            "retry with force to destroy it, or check the guest's ACPI support"
        )
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (_VIR_ERR_OPERATION_INVALID, _VIR_ERR_NO_DOMAIN):  # stopped meanwhile
            raise VmOpError(f"VM {name!r} on {_host(conn)} could not be destroyed: {exc}") from None


def _undefine(libvirt: Any, dom: Any) -> None:
    # Managed-save images and UEFI variables belong to the VM and go with it;
    # drivers without those flags (the test driver) refuse them: plain undefine there.
    flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code == _VIR_ERR_OPERATION_INVALID:  # transient: gone with destroy
            return
        if code not in (_VIR_ERR_INVALID_ARG, _VIR_ERR_NO_SUPPORT):
            raise
        dom.undefine()


def delete_vm(conn: Any, name: str) -> None:
    """Destroy (if running) and undefine a VM and remove the overlay cloudmon created for it.

    A VM that does not exist is not an error.  Disks cloudmon did not create are
    never touched.
    """
    libvirt = _libvirt()
    dom = _lookup(conn, name)
    if dom is None:
        return
    meta: CloudmonMeta | None = None
    try:
        meta = _parse_meta(dom.XMLDesc(0))
        if _state(dom) in _ACTIVE_STATES:
            dom.destroy()
        _undefine(libvirt, dom)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != _VIR_ERR_NO_DOMAIN:  # else: removed meanwhile, as asked
            raise VmOpError(f"VM {name!r} on {_host(conn)} could not be deleted: {exc}") from None
    _remove_overlay(meta.overlay if meta is not None else None)


def host_capacity(conn: Any) -> dict[str, float]:
    """The host's size and what its domains take.

    ``vcpus`` and ``memory_mib`` (the host's), ``vcpus_used`` and
    ``memory_mib_used`` (running domains), ``vcpus_defined`` and
    ``memory_mib_defined`` (every defined domain, running or not), ``domains``
    and ``domains_running``.
    """
    libvirt = _libvirt()
    try:
        info = conn.getInfo()
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise VmOpError(f"cannot read host capacity of {_host(conn)}: {exc}") from None
    out = {
        "vcpus": float(info[2]),
        "memory_mib": float(info[1]),
        "vcpus_used": 0.0,
        "memory_mib_used": 0.0,
        "vcpus_defined": 0.0,
        "memory_mib_defined": 0.0,
        "domains": 0.0,
        "domains_running": 0.0,
    }
    for dom in doms:
        try:
            state, max_kib, _cur_kib, vcpus, _cpu_time = dom.info()
        except libvirt.libvirtError:
            continue  # undefined meanwhile
        mib = max_kib / 1024.0
        out["domains"] += 1
        out["vcpus_defined"] += vcpus
        out["memory_mib_defined"] += mib
        if STATES.get(state, "nostate") in _ACTIVE_STATES:
            out["domains_running"] += 1
            out["vcpus_used"] += vcpus
            out["memory_mib_used"] += mib
    return out


def iter_overlays(directory: str | Path) -> Iterator[Path]:
    """Overlay files in ``directory`` (to find ones no VM uses any more)."""
    d = Path(directory)
    if d.is_dir():
        yield from sorted(d.glob("*.qcow2"))
