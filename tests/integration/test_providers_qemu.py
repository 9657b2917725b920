"""LibvirtProvider against a real libvirtd with a real QEMU guest (tests/integration/vmhost.py).

One libvirtd "host" in its own namespaces; the provider creates a guest from a
template domain XML (the test guest's kernel and initramfs, TCG) with a
copy-on-write qcow2 overlay on the guest's disk image, sees it running as a
real QEMU process, deletes it, and nothing is left: no domain, no overlay, no
process once the lab is closed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloudmon.providers import InstanceState, LaunchRequest
from tests.integration import vmhost

pytestmark = [pytest.mark.qemu, pytest.mark.integration]

libvirt = pytest.importorskip("libvirt")

from cloudmon.providers.libvirt import LibvirtProvider  # noqa: E402


def _template(image: vmhost.GuestImage) -> str:
    return f"""<domain type='qemu'>
  <name>template</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>console=ttyS0 quiet loglevel=1 panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{vmhost.QEMU_BINARY}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{image.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
    <video><model type='none'/></video>
  </devices>
</domain>"""


def _guest_pid(host: vmhost.VmHost, name: str) -> int | None:
    """The pid of the guest's QEMU process (from libvirt's pid file, checked to be QEMU)."""
    try:
        pid = int(host.run_path("libvirt", "qemu", f"{name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"qemu-system" in cmdline else None


def _alive(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_real_vm_is_created_seen_running_and_deleted(tmp_path: Path) -> None:
    missing = vmhost.missing_prerequisites()
    if missing:
        pytest.skip("real QEMU guests need: " + ", ".join(missing))
    image = vmhost.ensure_guest_image()
    template = tmp_path / "guest.xml"
    template.write_text(_template(image), encoding="utf-8")
    overlays = tmp_path / "overlays"
    lab = vmhost.VmLab()
    try:
        host = lab.add_host("h0")
        lab.start()
        provider = LibvirtProvider(
            {
                "hosts": {"h0": host.uri},
                "template_xml": str(template),
                "base_image": str(image.disk),
                "base_format": "raw",
                "overlay_dir": str(overlays),
                "stop_timeout_s": 2,
            }
        )
        try:
            assert provider.hosts()["h0"]["vcpus"] >= 1
            info = provider.create(LaunchRequest(group="web", name="web-1", vcpus=1, memory_mib=128))
            lab.pids.update(host.qemu_pids())  # so that close() kills it even if the test fails here
            assert (info.state, info.host) == (InstanceState.RUNNING, "h0")
            pid = _guest_pid(host, "web-1")
            assert pid is not None, "libvirt says running but there is no QEMU process"
            assert (overlays / "web-1.qcow2").is_file()
            desc = provider.describe(["web-1"])["web-1"]
            assert (desc.state, desc.host, desc.group) == (InstanceState.RUNNING, "h0", "web")
            assert provider.hosts()["h0"]["memory_mib_used"] == 128

            provider.delete("web-1")
            assert provider.describe(["web-1"])["web-1"].state is InstanceState.MISSING
            assert not (overlays / "web-1.qcow2").exists()
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pid is not None
            assert not _alive(pid)
        finally:
            provider.close()
    finally:
        lab.close()
    left = list(vmhost.iter_leftovers(lab))
    assert not left, f"the lab left things behind: {left}"
    assert list(overlays.glob("*")) == []
