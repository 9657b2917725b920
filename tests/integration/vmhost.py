"""Real libvirtd "hosts" and real QEMU guests (software emulation) for integration tests.

Nothing here is a fake: each :class:`VmHost` is the distribution's ``libvirtd``
started in its own network, mount, UTS and cgroup namespaces, with private
``/run``, ``/etc/libvirt``, ``/var/{lib,cache,log}/libvirt`` bind-mounted from a
temporary directory, its own hostname and a distinct ``host_uuid``; each guest is a
real ``qemu-system-x86_64`` process (TCG, no KVM needed) that libvirtd starts.

Typical use::

    image = ensure_guest_image()                      # cached kernel + initramfs
    with VmLab() as lab:
        host = lab.add_host("h0")
        lab.start()
        guest = host.start_guest("g0", image)
        guest.console.command("cpu", "on")            # the guest now burns a vCPU
        ...

Two hosts joined by a veth pair, for live migration::

    with VmLab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.link(a, b)                                # before lab.start()
        lab.start()
        g = a.start_guest("g0", image)
        g.migrate(b)                                  # LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE

The guest is a Debian kernel plus a busybox initramfs whose ``/init``
(``tests/integration/guest/init``) answers one-line commands on its serial
console (:class:`GuestConsole`), so tests make it do measurable work (CPU loop,
disk reads, network packets, memory use) when they choose, not on a timer.

``close()`` (of the lab; hosts and guests are owned by it) destroys the guests,
stops libvirtd by pid, kills every QEMU or other process left in each host's
cgroup (or named by libvirt's pid files) by pid and removes the cgroups and
temporary files; the namespaces die with their last process and the mounts with
their namespace, so nothing is left behind even when a test fails half-way or a
daemon was killed. :func:`iter_leftovers` lists anything a closed lab left
(processes, cgroups, mounts, network devices, its directory): tests assert it is empty.

API in short: :func:`ensure_guest_image` (cached kernel/initramfs/disk),
:class:`VmLab` (``add_host``, ``link``, ``start``, ``close``, ``pids``),
:class:`VmHost` (``uri`` for libvirt clients such as the agent, ``tcp_uri``,
``conn()``, ``start_guest``, ``nsexec``, ``qemu_pids``, ``log_text``),
:class:`Guest` (``domain()``, ``console``, ``migrate``, ``tap``, ``address``),
:class:`GuestConsole` (``command``, ``wait_ready``, ``boot_id``).
``python -m tests.integration.vmhost`` builds the guest image ahead of time.

Each host gets its own cgroup v1 subtree (cpu, cpuacct, memory, blkio) where the
machine has cgroup v1, as this project's machines do; elsewhere hosts run without
cgroups (``VmLab(cgroups=False)``), which libvirt handles by reading ``/proc``.

Needs root, ``/dev/net/tun``, ``unshare``/``nsenter``/``ip`` (util-linux, iproute2),
``libvirtd`` with its QEMU driver, ``qemu-system-x86_64``, ``dpkg-deb``, and (on a
cold cache only) ``apt-get download`` of ``busybox-static`` and the Debian kernel.
:func:`missing_prerequisites` lists what is absent.
"""

from __future__ import annotations

import contextlib
import grp
import gzip
import hashlib
import io
import logging
import lzma
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).with_name("guest")
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
LIBVIRTD = "/usr/sbin/libvirtd"
# Kernel modules the guest loads, in dependency order (virtio PCI transport, NIC,
# block device, balloon for guest-reported memory statistics).
GUEST_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/virtio/virtio_balloon.ko",
)
# Controllers each host gets its own subtree of; libvirt puts each guest's
# machine scope below it, so per-VM CPU/memory/blkio accounting is per host.
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio")
MIGRATE_FLAGS_NAMES = (
    "VIR_MIGRATE_LIVE",
    "VIR_MIGRATE_PEER2PEER",
    "VIR_MIGRATE_PERSIST_DEST",
    "VIR_MIGRATE_UNDEFINE_SOURCE",
)


class VmHostError(RuntimeError):
    """A host or guest could not be prepared, started or reached."""


def cgroup_v1_available() -> bool:
    """Whether the cgroup v1 controllers each host gets a subtree of are mounted here.

    Without them (a cgroup v2-only machine) hosts run without cgroups: libvirt then
    takes a guest's CPU time from ``/proc`` and the harness tracks QEMU by pid file.
    """
    return all((Path("/sys/fs/cgroup") / c / "cgroup.procs").exists() for c in CGROUP_CONTROLLERS)


def default_cache_dir() -> Path:
    """``$CLOUDMON_TEST_CACHE`` or ``~/.cache/cloudmon-tests`` (kept between runs)."""
    env = os.environ.get("CLOUDMON_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cloudmon-tests"


def missing_prerequisites() -> list[str]:
    """Hard prerequisites that are absent here (empty when real guests can run)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (namespaces, cgroups and tap devices need it)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    for tool in (QEMU_BINARY, LIBVIRTD):
        if not os.access(tool, os.X_OK):
            missing.append(tool)
    for name in ("unshare", "nsenter", "mount", "hostname", "ip", "dpkg-deb"):
        if shutil.which(name) is None:
            missing.append(name)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python")
    return missing


# --------------------------------------------------------------------------- guest image


@dataclass(frozen=True)
class GuestImage:
    """Boot files of the test guest (kernel and initramfs) and a read-only data disk."""

    kernel: Path
    initrd: Path
    disk: Path
    disk_bytes: int


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A ``newc`` cpio archive of ``(name, mode, data, rdev)`` entries (what the kernel unpacks)."""
    out = io.BytesIO()

    def header(ino: int, name: str, mode: int, size: int, rdev: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, os.major(rdev), os.minor(rdev), len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        header(ino, name, mode, len(data), rdev)
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    header(0, "TRAILER!!!", 0, 0, 0)
    return out.getvalue()


def _run(args: list[str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a short command; a failure raises :class:`VmHostError` with its output."""
    try:
        res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmHostError(f"{args[0]} failed: {exc}") from exc
    if res.returncode != 0:
        raise VmHostError(
            f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}"
        )
    return res.stdout


def _kernel_package() -> str:
    """The versioned Debian kernel package ``linux-image-amd64`` points at now."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if match is None:
        raise VmHostError(
            f"cannot tell the kernel package from `apt-cache depends linux-image-amd64`: {out!r}"
        )
    return match.group(1)


def ensure_guest_image(cache_dir: Path | None = None, disk_mib: int = 8) -> GuestImage:
    """Build (once) and return the guest's kernel, initramfs and data disk.

    Cached in ``cache_dir`` (default :func:`default_cache_dir`) under a key that
    covers the init script, so a second run costs nothing. A cold build runs
    ``apt-get download busybox-static <kernel package>`` (≈ 72 MB, a few seconds)
    and extracts only the kernel, nine modules and busybox.
    """
    cache = (cache_dir or default_cache_dir()) / "guest"
    init = (GUEST_DIR / "init").read_bytes()
    key = hashlib.sha256(init + "\n".join(GUEST_MODULES).encode() + b"v2").hexdigest()[:12]
    out = cache / key
    kernel, initrd, disk = out / "vmlinuz", out / "initrd.img", out / "data.img"
    disk_bytes = disk_mib * 1024 * 1024
    if not (kernel.exists() and initrd.exists()):
        _build_guest(out, init)
    if not disk.exists() or disk.stat().st_size != disk_bytes:
        # Random content: nothing (host page cache aside) can make reading it free.
        tmp = disk.with_suffix(".tmp")
        tmp.write_bytes(os.urandom(disk_bytes))
        tmp.rename(disk)
    return GuestImage(kernel, initrd, disk, disk_bytes)


def _boot_kernel(bzimage: bytes, boot_dir: Path) -> bytes:
    """The kernel QEMU should load: the uncompressed ELF ``vmlinux`` when the kernel can boot that way.

    Debian's x86 kernels are XZ-compressed and built with ``CONFIG_PVH``; QEMU boots
    the ELF directly through its PVH entry point, which skips decompressing ≈ 60 MB
    under software emulation and halves the guest's boot time (≈ 9 s to ≈ 4.5 s).
    """
    configs = list(boot_dir.glob("config-*"))
    pvh = bool(configs) and "\nCONFIG_PVH=y\n" in configs[0].read_text(errors="replace")
    start = bzimage.find(b"\xfd7zXZ\x00")
    if not pvh or start < 0:
        return bzimage
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError:
        return bzimage
    return elf if elf.startswith(b"\x7fELF") else bzimage


def _build_guest(out: Path, init: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cm-guest-build-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            kpkg = _kernel_package()
            _run(["apt-get", "download", "-q", "busybox-static", kpkg], cwd=tmp, timeout=600)
        except VmHostError as exc:
            # Stale or missing package lists (a fresh machine, or a kernel the
            # mirror has since replaced): refresh them once and try again.
            log.info("apt-get download failed (%s); running apt-get update", exc)
            _run(["apt-get", "update", "-qq"], timeout=600)
            kpkg = _kernel_package()
            _run(["apt-get", "download", "-q", "busybox-static", kpkg], cwd=tmp, timeout=600)
        debs = {p.name.split("_", 1)[0]: p for p in tmp.glob("*.deb")}
        if "busybox-static" not in debs or kpkg not in debs:
            raise VmHostError(f"apt-get download gave {sorted(debs)}; wanted busybox-static and {kpkg}")
        root = tmp / "x"
        for deb in debs.values():
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        moddir = next((root / "lib" / "modules").iterdir()) / "kernel"
        dir_mode = stat.S_IFDIR | 0o755
        entries: list[tuple[str, int, bytes, int]] = [
            (d, dir_mode, b"", 0) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp")
        ]
        entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, (root / "bin" / "busybox").read_bytes(), 0))
        entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0))
        entries.append(("init", stat.S_IFREG | 0o755, init, 0))
        for mod in GUEST_MODULES:
            path = moddir / mod
            if not path.exists():
                raise VmHostError(f"kernel package {kpkg} has no module {mod}")
            entries.append((f"lib/modules/{path.name}", stat.S_IFREG | 0o644, path.read_bytes(), 0))
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        (staging / "vmlinuz").write_bytes(_boot_kernel(vmlinuz.read_bytes(), root / "boot"))
        (staging / "initrd.img").write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
        shutil.rmtree(out, ignore_errors=True)
        # Rename makes a concurrent or interrupted build harmless: the key dir is complete or absent.
        try:
            staging.rename(out)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (out / "initrd.img").exists():
                raise
    # Images built from an older init script or module list are dead weight (≈ 75 MB each).
    for stale in out.parent.iterdir():
        if stale != out and not stale.name.startswith(".") and (stale / "initrd.img").exists():
            shutil.rmtree(stale, ignore_errors=True)
    log.info("built guest image %s from %s in %.1f s", out, kpkg, time.monotonic() - started)


# --------------------------------------------------------------------------- console


class GuestConsole:
    """Line protocol over the guest's serial console (a Unix socket QEMU listens on).

    ``command("cpu", "on")`` sends ``"<id> cpu on"`` and returns the detail words of
    the guest's ``"CMGUEST <id> ok <bootid> ..."`` answer. Output from before the
    connection is lost (QEMU drops it), hence :meth:`wait_ready` polls with ``ping``.
    """

    def __init__(self, path_fn: Callable[[], Path]) -> None:
        self._path_fn = path_fn
        self._sock: socket.socket | None = None
        self._buf = b""
        self._seq = 0
        self.boot_id = ""
        self.transcript: list[str] = []

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._path_fn()))
            except OSError:
                sock.close()
                raise
            self._sock = sock
            self._buf = b""
        return self._sock

    def reconnect(self) -> None:
        """Drop the connection; the next command connects to the current path (after migration)."""
        self.close()

    def close(self) -> None:
        """Close the socket (the guest keeps running)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, line: str) -> None:
        self._connect().sendall(line.encode() + b"\n")

    def _read_answer(self, ids: set[str], deadline: float) -> list[str] | None:
        sock = self._connect()
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                text = raw.decode("utf-8", "replace").strip("\r\x00 ")
                if text:
                    self.transcript.append(text)
                    del self.transcript[:-200]
                words = text.split()
                if len(words) >= 4 and words[0] == "CMGUEST" and words[1] in ids and words[2] == "ok":
                    self.boot_id = words[3]
                    return words[4:]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                return None
            if not chunk:
                raise VmHostError("guest console closed")
            self._buf += chunk

    def command(self, cmd: str, arg: str = "", timeout: float = 60.0) -> list[str]:
        """Run one guest command and return its answer's detail words."""
        self._seq += 1
        ident = f"c{self._seq}"
        self._send(f"{ident} {cmd} {arg}".rstrip())
        words = self._read_answer({ident}, time.monotonic() + timeout)
        if words is None:
            raise VmHostError(
                f"guest gave no answer to {cmd!r} in {timeout} s; console tail: {self.transcript[-10:]}"
            )
        return words

    def wait_ready(self, timeout: float = 90.0, alive: Callable[[], bool] | None = None) -> None:
        """Poll with ``ping`` until the guest's init answers (boot takes several seconds under TCG)."""
        deadline = time.monotonic() + timeout
        sent: set[str] = set()
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise VmHostError(f"guest stopped while booting; console tail: {self.transcript[-10:]}")
            try:
                self._seq += 1
                ident = f"p{self._seq}"
                sent.add(ident)
                self._send(f"{ident} ping")
                if self._read_answer(sent, min(deadline, time.monotonic() + 1.0)) is not None:
                    return
            except OSError:
                self.close()
                time.sleep(0.2)
        raise VmHostError(f"guest not ready after {timeout} s; console tail: {self.transcript[-10:]}")


# --------------------------------------------------------------------------- hosts and guests


def _libvirt() -> Any:
    import libvirt

    # libvirt prints every error to stderr by default; the harness raises or
    # reports them itself (polling a daemon that is still starting fails on purpose).
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


@dataclass
class Guest:
    """A running test guest on a :class:`VmHost` (it follows the guest when migrated)."""

    name: str
    host: VmHost
    image: GuestImage
    address: str
    peer: str
    tap: str
    console: GuestConsole = field(init=False)

    def __post_init__(self) -> None:
        self.console = GuestConsole(lambda: self.host.run_path("cloudmon-guest", f"{self.name}.sock"))

    def domain(self) -> Any:
        """The libvirt domain on the guest's current host."""
        return self.host.conn().lookupByName(self.name)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the guest's init answers on the console."""
        self.console.wait_ready(timeout, alive=lambda: bool(self.domain().isActive()))

    def migrate(self, dest: VmHost) -> None:
        """Live-migrate to ``dest`` (peer to peer over the hosts' link); the console reconnects."""
        lv = _libvirt()
        if dest.address is None:
            raise VmHostError(f"host {dest.name} has no link address; call VmLab.link() before start()")
        flags = 0
        for name in MIGRATE_FLAGS_NAMES:
            flags |= getattr(lv, name)
        params = {lv.VIR_MIGRATE_PARAM_URI: f"tcp://{dest.address}"}
        self.console.close()
        self.domain().migrateToURI3(dest.tcp_uri, params, flags)
        self.host.guests.pop(self.name, None)
        self.host = dest
        dest.guests[self.name] = self
        dest.lab.pids.update(dest.qemu_pids())
        dest.configure_tap(self)


class VmHost:
    """One libvirtd in private namespaces; created and owned by :class:`VmLab`."""

    def __init__(self, lab: VmLab, name: str, index: int) -> None:
        self.lab = lab
        self.name = name
        self.index = index
        self.root = lab.base / name
        self.host_uuid = str(uuid.uuid4())
        self.address: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.guests: dict[str, Guest] = {}
        self._conn: Any = None
        self._cgroups: list[Path] = []
        self._passwd = False
        self._log = self.root / "libvirtd.out"

    # paths -----------------------------------------------------------------
    def run_path(self, *parts: str) -> Path:
        """A path under this host's ``/run``, as seen from outside its mount namespace."""
        return self.root.joinpath("run", *parts)

    @property
    def socket_path(self) -> Path:
        return self.run_path("libvirt", "libvirt-sock")

    @property
    def uri(self) -> str:
        """URI that reaches this libvirtd from the test process (its Unix socket)."""
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def tcp_uri(self) -> str:
        """URI another host uses to reach this one over the link."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_text(self) -> str:
        """libvirtd's own log and its stdout/stderr, for failure messages."""
        parts = []
        for path in (self._log, self.root / "var-log-libvirt" / "libvirtd.log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # setup -----------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in (
            "run/libvirt",
            "run/cloudmon-guest",
            "etc-libvirt",
            "var-lib-libvirt/qemu",
            "var-cache-libvirt/qemu",
            "var-log-libvirt/qemu",
        ):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        qemu_conf = [
            'user = "root"',
            'group = "root"',
            "dynamic_ownership = 0",
            "remember_owner = 0",
            'security_driver = "none"',
            "namespaces = []",
            'stdio_handler = "file"',
            "cgroup_controllers = [ "
            + ", ".join(f'"{c}"' for c in (CGROUP_CONTROLLERS if self.lab.cgroups else ()))
            + " ]",
        ]
        daemon_conf = [
            f'host_uuid = "{self.host_uuid}"',
            "listen_tls = 0",
            'auth_unix_rw = "none"',
            'auth_unix_ro = "none"',
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
        ]
        if self.address is not None:
            qemu_conf += [f'migration_address = "{self.address}"', f'migration_host = "{self.address}"']
            daemon_conf += ["listen_tcp = 1", f'listen_addr = "{self.address}"', 'auth_tcp = "none"']
        etc = self.root / "etc-libvirt"
        (etc / "qemu.conf").write_text("\n".join(qemu_conf) + "\n")
        (etc / "libvirtd.conf").write_text("\n".join(daemon_conf) + "\n")
        # libvirt looks the libvirt-qemu user up even with user="root"; give it one
        # in this host's /etc only, leaving the machine's passwd alone.
        try:
            pwd.getpwnam("libvirt-qemu")
            grp.getgrnam("libvirt-qemu")
        except KeyError:
            self._passwd = True
            passwd = Path("/etc/passwd").read_text()
            group = Path("/etc/group").read_text()
            if not re.search(r"^libvirt-qemu:", passwd, re.M):
                passwd += "libvirt-qemu:x:64055:64055:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
            if not re.search(r"^libvirt-qemu:", group, re.M):
                group += "libvirt-qemu:x:64055:\n"
            (self.root / "passwd").write_text(passwd)
            (self.root / "group").write_text(group)

    def _make_cgroups(self) -> None:
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(","):
                own[c] = path
        for ctrl in CGROUP_CONTROLLERS:
            mount = Path("/sys/fs/cgroup") / ctrl
            if not (mount / "cgroup.procs").exists():
                raise VmHostError(f"cgroup v1 controller {ctrl} is not mounted at {mount}")
            cg = mount / own.get(ctrl, "/").lstrip("/") / f"cloudmon-vmhost-{self.lab.token}-{self.name}"
            cg.mkdir(parents=True, exist_ok=True)
            self._cgroups.append(cg)

    def _launch(self) -> None:
        """Start the namespaces, paused before libvirtd until :meth:`_release`."""
        self._write_config()
        if self.lab.cgroups:
            self._make_cgroups()
        join = "".join(f'echo $$ > "{cg}/cgroup.procs" || exit 90\n' for cg in self._cgroups)
        binds = [
            ("run", "/run"),
            ("etc-libvirt", "/etc/libvirt"),
            ("var-lib-libvirt", "/var/lib/libvirt"),
            ("var-cache-libvirt", "/var/cache/libvirt"),
            ("var-log-libvirt", "/var/log/libvirt"),
        ]
        inner = ["set -e"]
        for src, dst in binds:
            inner.append(f'mkdir -p {dst} && mount --bind "{self.root / src}" {dst}')
        caps = self.lab.caps_cache
        inner.append(
            f'mkdir -p /var/cache/libvirt/qemu/capabilities && mount --bind "{caps}" /var/cache/libvirt/qemu/capabilities'
        )
        if self._passwd:
            inner.append(f'mount --bind "{self.root / "passwd"}" /etc/passwd')
            inner.append(f'mount --bind "{self.root / "group"}" /etc/group')
        # A fresh cgroup v1 mount inside the cgroup namespace is rooted at this
        # host's own subtree, so libvirt's machine.slice lands below it.
        if self.lab.cgroups:
            inner.append("mount -t tmpfs -o mode=755 cgroup-root /sys/fs/cgroup")
        for ctrl in CGROUP_CONTROLLERS if self.lab.cgroups else ():
            inner.append(
                f"mkdir /sys/fs/cgroup/{ctrl} && mount -t cgroup -o {ctrl} cgroup /sys/fs/cgroup/{ctrl}"
            )
        inner.append(f"hostname cm-{self.name}")
        inner.append("ip link set lo up")
        inner.append("echo cm-vmhost-paused")
        inner.append("read go")
        inner.append('[ "$go" = go ] || exit 91')
        listen = " --listen" if self.address is not None else ""
        inner.append(f'exec {LIBVIRTD}{listen} >>"{self._log}" 2>&1 </dev/null')
        cgroup_ns = " --cgroup" if self.lab.cgroups else ""
        outer = (
            join + f'exec unshare --net --mount --uts{cgroup_ns} --propagation private -- sh -c "$CM_INNER"'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT")}
        env["CM_INNER"] = "\n".join(inner)
        self.proc = subprocess.Popen(
            ["sh", "-c", outer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log.open("ab"),
            env=env,
            cwd=self.root,
            start_new_session=True,
        )
        self.lab.pids.add(self.proc.pid)
        line = self._read_line(30.0)
        if line != "cm-vmhost-paused":
            raise VmHostError(f"host {self.name}: namespace setup failed ({line!r}):\n{self.log_text()}")

    def _read_line(self, timeout: float) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        import selectors

        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    break
                buf += chunk
        return buf.decode(errors="replace").strip()

    def _release(self) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll the daemon's socket until a connection answers (the first start probes QEMU)."""
        lv = _libvirt()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise VmHostError(f"libvirtd of {self.name} exited:\n{self.log_text()}")
            if self.socket_path.exists():
                try:
                    conn = lv.open(self.uri)
                    conn.getCapabilities()
                except lv.libvirtError as exc:
                    last = exc
                else:
                    self._conn = conn
                    return
            time.sleep(0.05)
        raise VmHostError(f"libvirtd of {self.name} not ready after {timeout} s ({last}):\n{self.log_text()}")

    def nsexec(self, args: list[str]) -> str:
        """Run a command in this host's network namespace (e.g. ``ip addr``)."""
        if self.pid is None:
            raise VmHostError(f"host {self.name} is not started")
        return _run(["nsenter", "-t", str(self.pid), "-n", "--", *args])

    def conn(self) -> Any:
        """This process's connection to the host's libvirtd (opened once)."""
        if self._conn is None:
            self._conn = _libvirt().open(self.uri)
        return self._conn

    # guests ----------------------------------------------------------------
    def guest_xml(self, guest: Guest, memory_mib: int = 128) -> str:
        """Domain XML of a test guest: TCG, 1 vCPU, read-only virtio disk, virtio NIC on a tap."""
        img = guest.image
        mac = "52:54:00:{:02x}:{:02x}:{:02x}".format(*tuple(hashlib.sha256(guest.name.encode()).digest()[:3]))
        cmdline = (
            f"console=ttyS0 quiet loglevel=1 panic=-1 cmguest.ip={guest.address}/24 cmguest.peer={guest.peer}"
        )
        return f"""<domain type='qemu'>
  <name>{guest.name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{img.kernel}</kernel>
    <initrd>{img.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BINARY}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{img.disk}'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='ethernet'>
      <mac address='{mac}'/>
      <target dev='{guest.tap}' managed='yes'/>
      <model type='virtio'/>
    </interface>
    <serial type='unix'>
      <source mode='bind' path='/run/cloudmon-guest/{guest.name}.sock'/>
      <target port='0'/>
    </serial>
    <memballoon model='virtio'>
      <stats period='1'/>
    </memballoon>
    <video><model type='none'/></video>
  </devices>
</domain>"""

    def configure_tap(self, guest: Guest) -> None:
        """Give the host side of the guest's tap its peer address so the guest's pings are answered."""
        self.nsexec(["ip", "addr", "replace", f"{guest.peer}/24", "dev", guest.tap])
        self.nsexec(["ip", "link", "set", guest.tap, "up"])

    def start_guest(self, name: str, image: GuestImage, memory_mib: int = 128, wait: bool = True) -> Guest:
        """Define and start a guest (persistent) and, with ``wait``, wait for its init to answer."""
        n = len(self.lab.guest_names)
        self.lab.guest_names.append(name)
        guest = Guest(name, self, image, address=f"10.213.{n}.2", peer=f"10.213.{n}.1", tap=f"cmtap{n}")
        self.run_path("cloudmon-guest").mkdir(parents=True, exist_ok=True)
        dom = self.conn().defineXML(self.guest_xml(guest, memory_mib))
        self.guests[name] = guest
        dom.create()
        self.lab.pids.update(self.qemu_pids())
        self.configure_tap(guest)
        if wait:
            guest.wait_ready()
        return guest

    # teardown --------------------------------------------------------------
    def qemu_pids(self) -> set[int]:
        """Pids of the QEMU processes libvirtd runs now (from its pid files; checked to be QEMU)."""
        pids: set[int] = set()
        for pidfile in self.run_path("libvirt", "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if _is_ours(pid):
                    pids.add(pid)
        return pids

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = self.qemu_pids()
        for cg in self._cgroups:
            if not cg.exists():
                continue
            for procs in cg.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
        return pids

    def close(self) -> None:
        """Destroy guests, stop libvirtd and every process in this host's cgroups, by pid."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                for dom in self._conn.listAllDomains():
                    with contextlib.suppress(Exception):
                        if dom.isActive():
                            dom.destroy()
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        for guest in self.guests.values():
            guest.console.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        # QEMU (double-forked by libvirtd) and anything else still in our cgroups.
        deadline = time.monotonic() + 15
        sig = signal.SIGTERM
        while pids := self._cgroup_pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if time.monotonic() > deadline:
                raise VmHostError(f"host {self.name}: processes {sorted(pids)} would not stop")
            if time.monotonic() > deadline - 10:
                sig = signal.SIGKILL
            time.sleep(0.1)
        for cg in self._cgroups:
            if cg.exists():
                for sub in sorted(
                    (p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
                ):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                with contextlib.suppress(OSError):
                    cg.rmdir()
        self._cgroups = [cg for cg in self._cgroups if cg.exists()]
        if self._cgroups:
            raise VmHostError(f"host {self.name}: cgroups left behind: {self._cgroups}")


class VmLab:
    """A set of :class:`VmHost` s under one temporary directory; ``close()`` stops them all.

    ``base`` defaults to a fresh short directory under ``/tmp`` (Unix socket paths
    are limited to 107 bytes); ``cache_dir`` keeps libvirt's QEMU capability cache
    warm between runs (the first probe costs ≈ 4 s per daemon).
    """

    def __init__(
        self, base: Path | None = None, cache_dir: Path | None = None, cgroups: bool | None = None
    ) -> None:
        self.token = uuid.uuid4().hex[:8]
        #: Give each host its own cgroup v1 subtree (default: when the machine has cgroup v1).
        self.cgroups = cgroup_v1_available() if cgroups is None else cgroups
        #: Every libvirtd and QEMU pid the lab started (see :meth:`leftovers`).
        self.pids: set[int] = set()
        self._own_base = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="cm-vm-", dir="/tmp"))
        if len(str(self.base)) > 60:
            # <base>/<host>/run/libvirt/libvirt-sock must fit a Unix socket address (107 bytes).
            raise VmHostError(f"lab directory {self.base} is too long for Unix socket paths; use a short one")
        self.caps_cache = (cache_dir or default_cache_dir()) / "libvirt-qemu-capabilities"
        self.caps_cache.mkdir(parents=True, exist_ok=True)
        self.hosts: list[VmHost] = []
        self.links: list[tuple[VmHost, VmHost, str]] = []
        self.guest_names: list[str] = []
        self._started = False

    def __enter__(self) -> VmLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> VmHost:
        """Declare a host (started by :meth:`start`)."""
        if self._started:
            raise VmHostError("add hosts before VmLab.start()")
        host = VmHost(self, name, len(self.hosts))
        self.hosts.append(host)
        return host

    def link(self, a: VmHost, b: VmHost) -> None:
        """Join two hosts by a veth pair with private addresses; libvirtd then listens on TCP there."""
        n = len(self.links)
        a.address, b.address = f"10.251.{n}.1", f"10.251.{n}.2"
        self.links.append((a, b, f"cmv{n}"))

    def start(self, timeout: float = 60.0) -> None:
        """Launch every host's namespaces, wire links, then start the daemons and wait for them."""
        self._started = True
        for host in self.hosts:
            host.root.mkdir(parents=True, exist_ok=True)
            host._launch()
        for a, b, ifname in self.links:
            assert a.pid is not None
            assert b.pid is not None
            assert a.address
            assert b.address
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    f"{ifname}a",
                    "netns",
                    str(a.pid),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"{ifname}b",
                    "netns",
                    str(b.pid),
                ]
            )
            for host, dev in ((a, f"{ifname}a"), (b, f"{ifname}b")):
                host.nsexec(["ip", "addr", "add", f"{host.address}/24", "dev", dev])
                host.nsexec(["ip", "link", "set", dev, "up"])
        for host in self.hosts:
            host._release()
        for host in self.hosts:
            host.wait_ready(timeout)

    def close(self) -> None:
        """Stop every host (guests first) and remove the temporary directory."""
        errors: list[str] = []

        def close_host(host: VmHost) -> None:
            try:
                host.close()
            except Exception as exc:  # noqa: BLE001 - keep closing the others, report at the end
                errors.append(str(exc))

        # In parallel: destroying a TCG guest takes ≈ 1.5 s, and hosts are independent.
        threads = [threading.Thread(target=close_host, args=(h,), name=f"close-{h.name}") for h in self.hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._own_base and not errors:
            shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise VmHostError("; ".join(errors))


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` is alive and a QEMU, libvirtd or namespace-setup process (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(k in cmd for k in (b"qemu-system", b"libvirtd", b"unshare", b"CM_INNER", b"cm-vmhost"))


def iter_leftovers(lab: VmLab) -> Iterator[str]:
    """What ``lab`` left behind: live processes, cgroups, mounts, network devices (nothing, normally)."""
    for pid in sorted(lab.pids):
        if _is_ours(pid):
            yield f"process {pid}"
    marker = f"cloudmon-vmhost-{lab.token}"
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (proc_dir / "cgroup").read_text():
                    yield f"process {proc_dir.name} in the lab's cgroups"
    for ctrl in CGROUP_CONTROLLERS:
        base = Path("/sys/fs/cgroup") / ctrl
        if base.exists():
            yield from (f"cgroup {cg}" for cg in base.rglob(f"{marker}-*"))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(lab.base) in line:
            yield f"mount {line}"
    for dev in Path("/sys/class/net").iterdir():
        if dev.name.startswith(("cmv", "cmtap")):
            yield f"network device {dev.name}"
    if lab.base.exists() and lab._own_base:
        yield f"directory {lab.base}"


if __name__ == "__main__":
    # `python -m tests.integration.vmhost` builds the guest image into the cache
    # ahead of time (e.g. from packaging/install.sh --test) and says where it is.
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    absent = missing_prerequisites()
    if absent:
        sys.stderr.write("real QEMU guests cannot run here; missing: " + ", ".join(absent) + "\n")
    image = ensure_guest_image()
    sys.stdout.write(f"guest kernel {image.kernel}\nguest initrd {image.initrd}\nguest disk {image.disk}\n")
