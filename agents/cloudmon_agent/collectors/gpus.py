"""NVIDIA GPUs through NVML (optional: ``nvidia-ml-py``, the ``gpu`` extra).

:func:`open_nvml` returns None when the module, the NVML library or a GPU
is missing -- then the agent has no GPU collector and the report no GPU
section; nothing is raised.  Per GPU: utilization, memory used/total,
temperature, power and the processes using it (pid + memory).

A GPU passed through to a VM is invisible to the host's NVML (it is bound to
``vfio-pci``).  Given ``vm_owners`` (PCI address -> VM name, from the VM
collector's hostdev lists), each assigned address the host NVML does not list
is reported as a GPU with only its PCI address and owning ``vm``.
:func:`vfio_pci_devices` finds NVIDIA devices bound to ``vfio-pci`` in sysfs so
a passed-through card shows up even when its VM is not running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Final

from cloudmon_agent.schema import Gpu, GpuProcess

log = logging.getLogger(__name__)

_NVIDIA_VENDOR: Final = "0x10de"
_DISPLAY_CLASS_PREFIX: Final = "0x03"


def open_nvml(*, probe_driver: bool = True) -> Any:
    """The initialised ``pynvml`` module, or None (no module, no library, no GPU).

    With ``probe_driver`` (the default) a Linux host without the NVIDIA kernel
    driver (no ``/proc/driver/nvidia``) returns None before importing pynvml:
    the import alone costs ~2.5 MiB of RSS that a GPU-less node should not pay.
    """
    if probe_driver and os.path.isdir("/proc") and not os.path.exists("/proc/driver/nvidia"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pynvml.nvmlShutdown()
            return None
    except pynvml.NVMLError as exc:
        log.debug("NVML device count failed: %s", exc)
        pynvml.nvmlShutdown()
        return None
    return pynvml


def normalize_pci(addr: str) -> str:
    """``00000000:65:00.0`` (NVML) or ``0000:65:00.0`` -> ``0000:65:00.0`` (lower case)."""
    addr = addr.strip().lower()
    dom, _, rest = addr.partition(":")
    if not rest:
        return addr
    try:
        return f"{int(dom, 16):04x}:{rest}"
    except ValueError:
        return addr


def vfio_pci_devices(sys: str = "/sys") -> list[str]:
    """PCI addresses of NVIDIA display devices bound to ``vfio-pci`` (passed through)."""
    base = f"{sys}/bus/pci/devices"
    out: list[str] = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for addr in names:
        d = f"{base}/{addr}"
        try:
            with open(f"{d}/vendor", encoding="ascii") as fh:
                vendor = fh.read().strip()
            with open(f"{d}/class", encoding="ascii") as fh:
                cls = fh.read().strip()
            driver = os.path.basename(os.readlink(f"{d}/driver"))
        except OSError:
            continue
        if vendor == _NVIDIA_VENDOR and cls.startswith(_DISPLAY_CLASS_PREFIX) and driver == "vfio-pci":
            out.append(normalize_pci(addr))
    return out


class GpuCollector:
    """Fills ``Report.gpus``.  Construct it only when :func:`open_nvml` (or a VM owner map) gives something."""

    field: str = "gpus"

    def __init__(
        self,
        nvml: Any,
        *,
        vm_owners: Callable[[], dict[str, str]] | None = None,
        sys: str = "/sys",
    ) -> None:
        self._nv = nvml
        self._vm_owners = vm_owners
        self._sys = sys
        self._handles: list[tuple[int, Any, str, str]] = []  # index, handle, pci, name
        if nvml is not None:
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                pci = normalize_pci(_str(nvml.nvmlDeviceGetPciInfo(h).busId))
                self._handles.append((i, h, pci, _str(nvml.nvmlDeviceGetName(h))[:128]))
        self._vfio = vfio_pci_devices(sys)

    def prime(self) -> None:
        """Nothing to prime (NVML gives current values)."""

    def collect(self) -> list[Gpu]:
        """Every host GPU, then every passed-through one."""
        nv = self._nv
        out: list[Gpu] = []
        seen: set[str] = set()
        for i, h, pci, name in self._handles:
            seen.add(pci)
            mem = self._get(nv.nvmlDeviceGetMemoryInfo, h)
            util = self._get(nv.nvmlDeviceGetUtilizationRates, h)
            temp = self._get(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            power_mw = self._get(nv.nvmlDeviceGetPowerUsage, h)
            out.append(
                Gpu(
                    index=i,
                    pci=pci,
                    name=name,
                    util_percent=min(100.0, float(util.gpu)) if util is not None else None,
                    mem_used=int(mem.used) if mem is not None else None,
                    mem_total=int(mem.total) if mem is not None else None,
                    temp_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                    processes=self._processes(h),
                )
            )
        owners = self._vm_owners() if self._vm_owners is not None else {}
        idx = len(self._handles)
        for pci in sorted(set(self._vfio) | {normalize_pci(a) for a in owners}):
            if pci in seen:
                continue
            # Assigned hostdevs that are not GPUs are listed only if sysfs says vfio-bound NVIDIA
            # or the host NVML cannot see them and they belong to a VM.
            vm = owners.get(pci)
            if pci not in self._vfio and vm is None:
                continue
            if pci not in self._vfio and not _is_display(self._sys, pci):
                continue
            out.append(Gpu(index=idx, pci=pci, vm=vm[:255] if vm else None))
            idx += 1
        return out

    def _get(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._nv.NVMLError:  # not supported on this card
            return None

    def _processes(self, h: Any) -> list[GpuProcess]:
        nv = self._nv
        procs: list[GpuProcess] = []
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for p in getattr(nv, getter)(h):
                    mem = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0
                    procs.append(GpuProcess(pid=int(p.pid), mem_bytes=max(0, mem)))
            except (nv.NVMLError, AttributeError):
                continue
        return procs

    def close(self) -> None:
        """Shut NVML down."""
        if self._nv is not None:
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlShutdown()
            self._nv = None


def _is_display(sys: str, pci: str) -> bool:
    # Without sysfs (tests, other OS) an assigned device counts as a GPU.
    try:
        with open(f"{sys}/bus/pci/devices/{pci}/class", encoding="ascii") as fh:
            return fh.read().strip().startswith(_DISPLAY_CLASS_PREFIX)
    except OSError:
        return True


def _str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
