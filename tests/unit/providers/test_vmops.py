"""VM lifecycle (agents/cloudmon_agent/vmops.py) on libvirt's test:/// driver with custom host files.

Each ``test://FILE`` connection is an independent fake host (its own CPUs,
memory and domains, not shared with other connections).  Overlays are made by
the real ``qemu-img``.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon_agent import vmops
from cloudmon_agent.vmops import VmOpError, VmSpec

libvirt = pytest.importorskip("libvirt")

DATA = Path(__file__).parent / "data"
HOST_A = DATA / "host-a.xml"
TEMPLATE = DATA / "template.xml"


@pytest.fixture
def conn() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; keep stderr quiet
    c = libvirt.open(f"test://{HOST_A}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is needed (apt-get install qemu-utils)")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    return base


def test_states_of_the_hosts_domains_and_a_missing_one(conn: Any) -> None:
    assert vmops.vm_state(conn, "other-1") == "running"
    assert vmops.vm_state(conn, "off-1") == "shutoff"
    assert vmops.vm_state(conn, "nope") == "missing"


def test_host_capacity_counts_running_and_defined_domains(conn: Any) -> None:
    cap = vmops.host_capacity(conn)
    assert cap["vcpus"] == 8
    assert cap["memory_mib"] == 16384
    assert (cap["vcpus_used"], cap["memory_mib_used"]) == (2, 4096)
    assert (cap["vcpus_defined"], cap["memory_mib_defined"]) == (3, 6144)
    assert (cap["domains"], cap["domains_running"]) == (2, 1)


def test_create_from_template_rewrites_identity_and_size(conn: Any) -> None:
    spec = VmSpec(
        name="web-1", vcpus=2, memory_mib=1024, template_xml=str(TEMPLATE), group="web", cmdline="quiet"
    )
    uuid = vmops.create_vm(conn, spec)
    dom = conn.lookupByName("web-1")
    assert dom.UUIDString() == uuid != "cccccccc-0000-0000-0000-000000000001"
    assert vmops.vm_state(conn, "web-1") == "running"
    _state, max_kib, _, vcpus, _ = dom.info()
    assert (max_kib, vcpus) == (1024 * 1024, 2)
    root = ET.fromstring(dom.XMLDesc(0))
    assert root.findtext("./os/cmdline") == "quiet"
    # the template's disk is kept (no base image) and its MAC is not copied
    assert root.find("./devices/disk/source").get("file") == "/images/base.img"  # type: ignore[union-attr]
    assert root.findtext("./devices/interface/mac") != "52:54:00:aa:bb:cc"
    assert vmops.domain_meta(conn, "web-1") == vmops.CloudmonMeta(group="web", overlay=None)
    assert set(vmops.cloudmon_domains(conn)) == {"web-1"}
    cap = vmops.host_capacity(conn)
    assert (cap["vcpus_used"], cap["memory_mib_used"]) == (4, 5120)


def test_create_is_idempotent_for_its_own_vms_and_refuses_foreign_names(conn: Any) -> None:
    spec = VmSpec(name="web-1", template_xml=str(TEMPLATE), start=False)
    first = vmops.create_vm(conn, spec)
    assert vmops.vm_state(conn, "web-1") == "shutoff"
    # a retried create (now with start) returns the same VM and starts it
    assert vmops.create_vm(conn, VmSpec(name="web-1", template_xml=str(TEMPLATE))) == first
    assert vmops.vm_state(conn, "web-1") == "running"
    with pytest.raises(VmOpError, match=r"'other-1' already exists .* not created by cloudmon"):
        vmops.create_vm(conn, VmSpec(name="other-1", template_xml=str(TEMPLATE)))


def test_create_from_base_image_makes_an_overlay_and_delete_removes_it(
    conn: Any, base_image: Path, tmp_path: Path
) -> None:
    overlays = tmp_path / "overlays"
    spec = VmSpec(
        name="app-1",
        vcpus=1,
        memory_mib=256,
        base_image=str(base_image),
        overlay_dir=str(overlays),
        domain_type="test",
        kernel="/boot/vmlinuz",
        group="app",
    )
    vmops.create_vm(conn, spec)
    overlay = overlays / "app-1.qcow2"
    info = subprocess.run(
        ["qemu-img", "info", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    assert f"backing file: {base_image}" in info
    assert "file format: qcow2" in info
    root = ET.fromstring(conn.lookupByName("app-1").XMLDesc(0))
    disk = root.find("./devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == str(overlay)  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert root.findtext("./os/kernel") == "/boot/vmlinuz"
    assert vmops.domain_meta(conn, "app-1") == vmops.CloudmonMeta(group="app", overlay=str(overlay))

    vmops.delete_vm(conn, "app-1")
    assert vmops.vm_state(conn, "app-1") == "missing"
    assert not overlay.exists()
    assert base_image.exists()
    vmops.delete_vm(conn, "app-1")  # deleting a missing VM is not an error


def test_template_with_base_image_points_the_first_disk_at_the_overlay(
    conn: Any, base_image: Path, tmp_path: Path
) -> None:
    spec = VmSpec(
        name="t-1", template_xml=str(TEMPLATE), base_image=str(base_image), overlay_dir=str(tmp_path)
    )
    vmops.create_vm(conn, spec)
    root = ET.fromstring(conn.lookupByName("t-1").XMLDesc(0))
    disk = root.find("./devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == str(tmp_path / "t-1.qcow2")  # type: ignore[union-attr]
    assert disk.find("readonly") is None


def test_a_failed_define_leaves_no_overlay(conn: Any, base_image: Path, tmp_path: Path) -> None:
    # libvirt rejects an unknown domain type at define time, after the overlay was made.
    spec = VmSpec(
        name="bad-1", base_image=str(base_image), overlay_dir=str(tmp_path), domain_type="no-such-type"
    )
    with pytest.raises(VmOpError, match=r"refused to define VM 'bad-1'"):
        vmops.create_vm(conn, spec)
    assert not (tmp_path / "bad-1.qcow2").exists()
    assert vmops.vm_state(conn, "bad-1") == "missing"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (VmSpec(name="x"), "give base_image .* or template_xml"),
        (VmSpec(name="x", base_image="/b.img"), "base_image needs overlay_dir"),
        (VmSpec(name="x", vcpus=0, template_xml="/t.xml"), "vcpus must be >= 1"),
        (VmSpec(name="a/b", template_xml="/t.xml"), "invalid VM name"),
        (VmSpec(name="x", template_xml="/nonexistent/t.xml"), "cannot read template domain XML"),
        (
            VmSpec(name="x", base_image="/nonexistent/b.img", overlay_dir="/tmp"),
            "base image .* does not exist",
        ),
    ],
)
def test_bad_specs_are_refused_with_the_reason(conn: Any, spec: VmSpec, message: str) -> None:
    with pytest.raises(VmOpError, match=message):
        vmops.create_vm(conn, spec)


def test_a_template_that_is_not_a_domain_is_refused(conn: Any, tmp_path: Path) -> None:
    bad = tmp_path / "t.xml"
    bad.write_text("<network/>", encoding="utf-8")
    with pytest.raises(VmOpError, match="is not a domain XML"):
        vmops.create_vm(conn, VmSpec(name="x", template_xml=str(bad)))
    bad.write_text("<domain", encoding="utf-8")
    with pytest.raises(VmOpError, match="is not valid XML"):
        vmops.create_vm(conn, VmSpec(name="x", template_xml=str(bad)))


def test_stop_start_and_delete_a_running_vm(conn: Any) -> None:
    vmops.create_vm(conn, VmSpec(name="s-1", template_xml=str(TEMPLATE)))
    vmops.stop_vm(conn, "s-1", timeout_s=5)
    assert vmops.vm_state(conn, "s-1") == "shutoff"
    vmops.stop_vm(conn, "s-1", timeout_s=5)  # already off: nothing to do
    vmops.start_vm(conn, "s-1")
    vmops.start_vm(conn, "s-1")  # already running: nothing to do
    assert vmops.vm_state(conn, "s-1") == "running"
    conn.lookupByName("s-1").suspend()
    vmops.start_vm(conn, "s-1")  # a paused VM is resumed
    assert vmops.vm_state(conn, "s-1") == "running"
    vmops.delete_vm(conn, "s-1")
    assert vmops.vm_state(conn, "s-1") == "missing"


def test_operations_on_a_missing_vm_say_so(conn: Any) -> None:
    with pytest.raises(VmOpError, match=r"cannot start VM 'ghost': it is not defined on test://"):
        vmops.start_vm(conn, "ghost")
    with pytest.raises(VmOpError, match=r"cannot stop VM 'ghost'"):
        vmops.stop_vm(conn, "ghost", timeout_s=1)


def test_delete_never_touches_disks_cloudmon_did_not_create(conn: Any, tmp_path: Path) -> None:
    disk = tmp_path / "foreign.img"
    disk.write_bytes(b"data")
    xml = f"""<domain type='test'><name>foreign</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='{disk}'/>
      <target dev='vda'/></disk></devices></domain>"""
    conn.defineXML(xml).create()
    vmops.delete_vm(conn, "foreign")
    assert vmops.vm_state(conn, "foreign") == "missing"
    assert disk.read_bytes() == b"data"


def test_missing_libvirt_is_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "libvirt", None)  # makes "import libvirt" fail
    with pytest.raises(VmOpError, match=r"pip install 'cloudmon-agent\[libvirt\]'"):
        vmops.vm_state(object(), "x")
