"""GPU collector: the real no-NVML path of this machine, and passthrough ownership on a fake sysfs."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.collectors import CollectorOptions, default_collectors
from cloudmon_agent.collectors.gpus import GpuCollector, normalize_pci, open_nvml, vfio_pci_devices
from cloudmon_agent.schema import Gpu


def _pci_dev(sys: Path, addr: str, vendor: str, cls: str, driver: str) -> None:
    d = sys / "bus" / "pci" / "devices" / addr
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "class").write_text(cls + "\n")
    drv = sys / "bus" / "pci" / "drivers" / driver
    drv.mkdir(parents=True, exist_ok=True)
    os.symlink(drv, d / "driver")


def test_no_nvml_library_means_no_gpu_section_and_no_error() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass  # the situation under test (no driver library / no GPU on this machine)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    assert open_nvml(probe_driver=False) is None  # pynvml imported, nvmlInit fails for real
    assert open_nvml() is None
    cols = default_collectors(CollectorOptions(libvirt_uri="", containers=False, top_n=0, budget_ms=0))
    try:
        assert [c.field for c in cols] == ["host"]
    finally:
        for c in cols:
            c.close()


def test_passed_through_gpu_is_reported_with_its_vm(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    _pci_dev(sys, "0000:65:00.0", "0x10de", "0x030200", "vfio-pci")  # NVIDIA 3D controller on vfio
    _pci_dev(sys, "0000:66:00.0", "0x10de", "0x030000", "vfio-pci")  # on vfio but not assigned to any VM
    _pci_dev(sys, "0000:67:00.0", "0x10de", "0x030000", "nvidia")  # the host's own
    _pci_dev(sys, "0000:03:00.0", "0x8086", "0x020000", "vfio-pci")  # an Intel NIC on vfio: not a GPU
    assert vfio_pci_devices(str(sys)) == ["0000:65:00.0", "0000:66:00.0"]
    owners = {"0000:65:00.0": "db-1", "0000:03:00.0": "router"}
    c = GpuCollector(None, vm_owners=lambda: owners, sys=str(sys))
    try:
        gpus = msgspec.json.decode(msgspec.json.encode(c.collect()), type=list[Gpu])
    finally:
        c.close()
    assert [(g.pci, g.vm) for g in gpus] == [("0000:65:00.0", "db-1"), ("0000:66:00.0", None)]
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.util_percent is None and g.processes == [] for g in gpus)


def test_pci_address_normalization() -> None:
    assert normalize_pci("00000000:65:00.0") == "0000:65:00.0"
    assert normalize_pci("0000:3B:00.1") == "0000:3b:00.1"
