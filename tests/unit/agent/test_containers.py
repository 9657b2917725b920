"""ContainerCollector on small fake cgroup trees (v1 and v2 layouts) and on this host's real cgroups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from cloudmon_agent.collectors.containers import ContainerCollector, classify
from cloudmon_agent.schema import Container

DOCKER_ID = "a" * 64
PODMAN_ID = "b" * 64


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2_group(root: Path, rel: str, usage_usec: int, mem: int, limit: str, rbytes: int, wbytes: int) -> None:
    d = root / rel
    _write(d / "cpu.stat", f"usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 1\n")
    _write(d / "memory.current", f"{mem}\n")
    _write(d / "memory.max", f"{limit}\n")
    _write(d / "io.stat", f"8:0 rbytes={rbytes} wbytes={wbytes} rios=1 wios=1\n8:16 rbytes=0 wbytes=0\n")


def _v1_group(root: Path, rel: str, usage_ns: int, mem: int, limit: int, rd: int, wr: int) -> None:
    _write(root / "cpuacct" / rel / "cpuacct.usage", f"{usage_ns}\n")
    _write(root / "memory" / rel / "memory.usage_in_bytes", f"{mem}\n")
    _write(root / "memory" / rel / "memory.limit_in_bytes", f"{limit}\n")
    _write(
        root / "blkio" / rel / "blkio.throttle.io_service_bytes",
        f"8:0 Read {rd}\n8:0 Write {wr}\n8:0 Sync 0\n8:0 Total {rd + wr}\nTotal {rd + wr}\n",
    )


def _by_name(cs: list[Container]) -> dict[str, Container]:
    valid = msgspec.json.decode(msgspec.json.encode(cs), type=list[Container])
    return {c.name: c for c in valid}


def test_v2_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu io memory\n")
    docker_root = tmp_path / "docker"
    _write(docker_root / "containers" / DOCKER_ID / "config.v2.json", json.dumps({"Name": "/web"}))
    groups = {
        f"system.slice/docker-{DOCKER_ID}.scope": "web",
        "system.slice/nginx.service": "nginx.service",
        f"user.slice/user-1000.slice/libpod-{PODMAN_ID}.scope": PODMAN_ID[:12],
        "machine.slice/machine-qemu\\x2d1\\x2dguest\\x2done.scope": "guest-one",
    }
    for rel in groups:
        _v2_group(root, rel, 1_000_000, 100 << 20, "max", 0, 0)
    _v2_group(root, "user.slice", 5, 5, "max", 0, 0)  # not a container: must not be listed
    clock = FakeClock()
    c = ContainerCollector(str(root), host_cpus=4, docker_root=str(docker_root), clock=clock)
    assert c.v2
    first = _by_name(c.collect())
    assert set(first) == set(groups.values())
    assert {n: x.kind for n, x in first.items()} == {
        "web": "docker",
        "nginx.service": "service",
        PODMAN_ID[:12]: "podman",
        "guest-one": "vm",
    }
    assert all(x.cpu_percent == 0 for x in first.values())  # priming
    # 2 s later web used 4 CPU-seconds (2 cores of 4 = 50 %), read 2 MB, wrote 1 MB, has a limit.
    _v2_group(
        root,
        f"system.slice/docker-{DOCKER_ID}.scope",
        5_000_000,
        200 << 20,
        str(1 << 30),
        2_000_000,
        1_000_000,
    )
    clock.t += 2
    web = _by_name(c.collect())["web"]
    assert web.cpu_percent == pytest.approx(50.0)
    assert (web.mem_bytes, web.mem_limit) == (200 << 20, 1 << 30)
    assert (web.io_read_bps, web.io_write_bps) == pytest.approx((1_000_000, 500_000))
    assert _by_name(c.collect())["nginx.service"].mem_limit is None


def test_v1_tree_with_cgroupfs_driver_names(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "cpuacct").mkdir(parents=True)
    _v1_group(root, f"docker/{DOCKER_ID}", 0, 10 << 20, 9223372036854771712, 0, 0)
    _v1_group(root, "machine/vm7.libvirt-qemu", 0, 1 << 30, 2 << 30, 0, 0)
    _v1_group(root, "system.slice/ssh.service", 0, 1 << 20, 9223372036854771712, 0, 0)
    clock = FakeClock()
    c = ContainerCollector(str(root), host_cpus=2, docker_root=str(tmp_path / "nodocker"), clock=clock)
    assert not c.v2
    c.prime()
    _v1_group(root, "machine/vm7.libvirt-qemu", 1_000_000_000, 1 << 30, 2 << 30, 4096, 8192)
    clock.t += 1
    got = _by_name(c.collect())
    assert set(got) == {DOCKER_ID[:12], "vm7", "ssh.service"}  # no config.v2.json: the short id
    vm = got["vm7"]
    assert vm.kind == "vm"
    assert vm.cpu_percent == pytest.approx(50.0)
    assert (vm.mem_bytes, vm.mem_limit, vm.io_read_bps, vm.io_write_bps) == (1 << 30, 2 << 30, 4096, 8192)
    assert got[DOCKER_ID[:12]].mem_limit is None  # v1's "unlimited" sentinel


def test_vanished_group_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu\n")
    _v2_group(root, "system.slice/a.service", 1, 1, "max", 0, 0)
    c = ContainerCollector(str(root), refresh_s=3600)
    assert [x.name for x in c.collect()] == ["a.service"]
    for f in (root / "system.slice/a.service").iterdir():
        f.unlink()
    assert c.collect() == []


def test_classify_ignores_conmon_and_plain_slices() -> None:
    assert classify(f"/machine.slice/libpod-conmon-{PODMAN_ID}.scope") is None
    assert classify("/system.slice") is None
    assert classify("/user.slice/user-1000.slice/session-1.scope") is None


@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup"), reason="no cgroup filesystem")
def test_real_cgroups_of_this_host() -> None:
    # This host is hybrid (v1 + empty v2): read as v1.  Whatever groups exist must validate.
    c = ContainerCollector()
    try:
        assert c.v2 == os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        c.prime()
        got = _by_name(c.collect())
        for x in got.values():
            assert x.kind in {"docker", "podman", "service", "vm"}
            assert 0 <= x.cpu_percent <= 100
    finally:
        c.close()


def test_real_v1_service_group_with_a_busy_process(tmp_path: Path) -> None:
    """A real cgroup (v1, as on this host) holding a busy child shows up with its CPU."""
    import subprocess
    import sys
    import time

    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists() or not os.access(base / "cpuacct", os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpuacct hierarchy")
    name = f"cloudmon-test-{os.getpid()}.service"
    dirs = [base / ctl / "system.slice" / name for ctl in ("cpuacct", "memory")]
    made: list[Path] = []
    child = None
    try:
        for d in dirs:
            for part in (d.parent, d):
                if not part.exists():
                    part.mkdir()
                    made.append(part)
        # The child touches 8 MiB only once it is in the groups: cgroup v1 charges a
        # memory group for pages allocated after the move, not before.
        busy = "import sys\nsys.stdin.readline()\nb = b'x' * (8 << 20)\nwhile True: pass"
        child = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE)
        for d in dirs:
            (d / "cgroup.procs").write_text(str(child.pid))
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        c = ContainerCollector(refresh_s=3600)
        try:
            c.prime()
            deadline = time.monotonic() + 10
            while (
                int((dirs[0] / "cpuacct.usage").read_text()) < 200_000_000
                or int((dirs[1] / "memory.usage_in_bytes").read_text()) < 8 << 20
            ) and time.monotonic() < deadline:
                time.sleep(0.02)
            got = _by_name(c.collect())
        finally:
            c.close()
        assert got[name].kind == "service"
        assert got[name].cpu_percent > 1
        assert got[name].mem_bytes > 0
    finally:
        if child is not None:
            child.kill()
            child.wait(timeout=10)
        for d in reversed(made):
            deadline = time.monotonic() + 5
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
