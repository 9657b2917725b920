"""GPU collector: the real no-NVML path of this machine, and passthrough ownership on a fake sysfs."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.collectors import CollectorOptions, default_collectors
from cloudmon_agent.collectors.gpus import GpuCollector, normalize_pci, open_nvml, vfio_pci_devices
from cloudmon_agent.schema import Gpu
from tests.benchmarks.bench_gpu import GPU_LOAD


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


# --- A real NVIDIA GPU (skipped where there is none) -------------------------------------------


def _smi(query: str, what: str = "--query-gpu") -> list[list[str]]:
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", f"{what}={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


@pytest.mark.gpu
def test_real_gpu_agrees_with_nvidia_smi_and_sees_a_working_process() -> None:
    """Against the real card: identity, memory, temperature and power agree with ``nvidia-smi``;
    a process doing matrix products shows as utilization and as a GPU process with its memory."""
    import shutil
    import subprocess
    import sys

    nvml = open_nvml()
    if nvml is None or shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU with NVML and nvidia-smi on this machine")
    c = GpuCollector(nvml)
    try:
        gpus = c.collect()
        smi = _smi("pci.bus_id,name,memory.total,temperature.gpu,power.draw")
        assert len(gpus) == len(smi)
        for g, (bus, name, mem_total_mib, temp, power) in zip(gpus, smi, strict=True):
            assert g.pci == normalize_pci(bus)
            assert g.name == name
            assert g.mem_total is not None
            assert abs(g.mem_total - int(mem_total_mib) * 2**20) < 2**20
            assert g.temp_c is not None
            assert abs(g.temp_c - float(temp)) <= 5
            if power not in ("[N/A]", "N/A"):
                assert g.power_w is not None
                assert abs(g.power_w - float(power)) <= max(30.0, 0.3 * float(power))
            assert g.util_percent is not None
            assert 0 <= g.util_percent <= 100
        try:
            import torch  # noqa: F401
        except ImportError:
            return  # nothing here to put load on the card with
        load = subprocess.Popen([sys.executable, "-c", GPU_LOAD, "60"], stdout=subprocess.PIPE, text=True)
        try:
            assert load.stdout is not None
            import selectors

            with selectors.DefaultSelector() as sel:  # PyTorch's start-up, bounded
                sel.register(load.stdout, selectors.EVENT_READ)
                assert sel.select(120), "the GPU load process did not start within 120 s"
            assert load.stdout.readline().strip() == "ready"
            best = 0.0
            mine = None
            for _ in range(100):  # up to ~10 s: NVML's utilization is a sliding average
                gpus = c.collect()
                best = max(best, max(g.util_percent or 0.0 for g in gpus))
                mine = next((p for g in gpus for p in g.processes if p.pid == load.pid), mine)
                if best >= 50 and mine is not None:
                    break
                import time

                time.sleep(0.1)
            assert best >= 50, f"utilization stayed at {best} % under continuous matrix products"
            smi_pids = {int(r[0]) for r in _smi("pid,used_memory", "--query-compute-apps")}
            if load.pid in smi_pids:  # nvidia-smi sees pids in this namespace; so must we
                assert mine is not None
                assert mine.mem_bytes >= 256 * 2**20
        finally:
            load.kill()
            load.wait(timeout=30)
    finally:
        c.close()
