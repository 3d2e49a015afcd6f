"""The worker's profiler: register facts and heartbeat metrics, with and without psutil and /proc.

The rule under test: a reading that cannot be made is None (unknown), never a
made-up 0, and nothing the platform does makes the profiler raise.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from retire_cluster.worker import profiler as profiler_module
from retire_cluster.worker.profiler import Profiler, detect_platform

METRIC_KEYS = {"cpu_usage", "memory_usage", "disk_usage", "load_average", "uptime", "worker_uptime"}
PERCENT_KEYS = ("cpu_usage", "memory_usage", "disk_usage")

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metrics(metrics: Dict[str, Any]) -> None:
    assert METRIC_KEYS <= set(metrics)
    for key, value in metrics.items():
        if key == "load_average":
            assert value is None or (isinstance(value, list) and all(is_number(v) for v in value)), value
        else:
            assert value is None or is_number(value), (key, value)
    for key in PERCENT_KEYS:
        assert metrics[key] is None or 0 <= metrics[key] <= 100, (key, metrics[key])
    assert is_number(metrics["worker_uptime"]) and metrics["worker_uptime"] >= 0


@pytest.fixture
def no_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiler_module, "_psutil", None)


@pytest.fixture
def no_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiler_module, "_read", lambda path: None)


class BrokenPsutil:
    """psutil that imports but fails on every call (as on some Android builds)."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(f"psutil.{name} is not permitted here")

        return fail


def fake_proc(
    monkeypatch: pytest.MonkeyPatch, stats: List[str], files: Optional[Dict[str, str]] = None
) -> None:
    """``/proc/stat`` answers each of ``stats`` in turn (then the last); other paths from ``files``."""
    samples: Iterator[str] = iter(stats)
    last = {"stat": stats[0]}

    def read(path: str) -> Optional[str]:
        if path == "/proc/stat":
            last["stat"] = next(samples, last["stat"])
            return last["stat"]
        return (files or {}).get(path)

    monkeypatch.setattr(profiler_module, "_read", read)


# -- register contents -------------------------------------------------------------


def test_device_info() -> None:
    info = Profiler(role="edge").device_info()
    assert set(info) >= {"hostname", "platform", "architecture", "python_version", "role"}
    assert isinstance(info["hostname"], str) and info["hostname"]
    assert info["platform"] == detect_platform()
    assert isinstance(info["architecture"], str) and info["architecture"]
    assert info["python_version"] == platform.python_version()
    assert info["role"] == "edge"
    assert Profiler().device_info()["role"] == "worker"


def test_detect_platform_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform.startswith("linux") and not hasattr(sys, "getandroidapilevel"):
        monkeypatch.delenv("ANDROID_ROOT", raising=False)
        monkeypatch.delenv("TERMUX_VERSION", raising=False)
        assert detect_platform() == "linux"
        monkeypatch.setenv("TERMUX_VERSION", "0.118.0")
        assert detect_platform() == "android"
    else:  # pragma: no cover - depends on the machine
        assert isinstance(detect_platform(), str)


def test_hardware_specs(tmp_path: Path) -> None:
    specs = Profiler(data_dir=tmp_path).hardware_specs()
    assert isinstance(specs["cpu_cores"], int) and specs["cpu_cores"] >= 1
    assert isinstance(specs["memory_total"], int) and specs["memory_total"] > 0
    assert isinstance(specs["disk_space"], int) and specs["disk_space"] > 0
    assert isinstance(specs["network_interfaces"], list)
    assert all(isinstance(name, str) for name in specs["network_interfaces"])


def test_disk_of_a_data_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    specs = Profiler(data_dir=tmp_path / "not" / "yet" / "made").hardware_specs()
    assert specs["disk_space"] > 0


def test_capabilities() -> None:
    caps = Profiler(extra_capabilities=("gpu", "computational", "camera")).capabilities()
    assert caps[0] == "computational"
    assert "gpu" in caps and "camera" in caps
    assert len(caps) == len(set(caps))
    assert "computational" in Profiler().capabilities()


# -- heartbeat metrics -------------------------------------------------------------


def test_system_metrics(tmp_path: Path) -> None:
    p = Profiler(data_dir=tmp_path)
    check_metrics(p.system_metrics())
    check_metrics(p.system_metrics())


def test_system_metrics_without_psutil(no_psutil: None, tmp_path: Path) -> None:
    p = Profiler(data_dir=tmp_path)
    check_metrics(p.system_metrics())
    check_metrics(p.system_metrics())
    assert p.hardware_specs()["memory_total"] > 0


@linux_only
def test_memory_from_proc_without_psutil(no_psutil: None) -> None:
    usage = Profiler().memory_usage()
    assert usage is not None and 0 < usage <= 100
    assert Profiler().memory_total() > 0


def test_broken_psutil_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(profiler_module, "_psutil", BrokenPsutil())
    p = Profiler(data_dir=tmp_path)
    check_metrics(p.system_metrics())
    assert p.hardware_specs()["memory_total"] > 0


def test_nothing_readable_means_unknown_not_zero(no_psutil: None, no_proc: None, tmp_path: Path) -> None:
    p = Profiler(data_dir=tmp_path)
    for _ in range(2):
        metrics = p.system_metrics()
        check_metrics(metrics)
        assert metrics["cpu_usage"] is None
        assert metrics["memory_usage"] is None
        assert metrics["uptime"] is None
    specs = p.hardware_specs()
    assert specs["cpu_cores"] >= 1
    assert specs["memory_total"] > 0  # os.sysconf still knows
    assert p.device_info()["hostname"]


def test_no_memory_source_at_all(no_psutil: None, no_proc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sysconf(name: str) -> int:
        raise ValueError(name)

    monkeypatch.setattr(profiler_module.os, "sysconf", no_sysconf, raising=False)
    p = Profiler()
    assert p.memory_usage() is None
    assert p.memory_total() == 0  # the register schema requires an integer here
    check_metrics(p.system_metrics())


def test_load_average_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loadavg() -> Any:
        raise OSError("not on this platform")

    monkeypatch.setattr(profiler_module.os, "getloadavg", no_loadavg, raising=False)
    metrics = Profiler().system_metrics()
    assert metrics["load_average"] is None
    check_metrics(metrics)


@pytest.mark.parametrize("stat", ["", "\n", "garbage\n", "cpu a b c d\n", "intr 1 2 3\ncpu 1 2 3 4\n"])
def test_unreadable_proc_stat_means_unknown_cpu(
    no_psutil: None, monkeypatch: pytest.MonkeyPatch, stat: str
) -> None:
    fake_proc(monkeypatch, [stat])
    p = Profiler()
    assert p.cpu_usage() is None
    assert p.cpu_usage() is None


@pytest.mark.parametrize(
    "meminfo",
    [
        "",
        "MemTotal: 1000 kB\n",
        "MemTotal: x kB\nMemAvailable: 10 kB\n",
        "MemTotal: 0 kB\nMemAvailable: 0 kB\n",
    ],
)
def test_unusable_meminfo_means_unknown_memory(
    no_psutil: None, monkeypatch: pytest.MonkeyPatch, meminfo: str
) -> None:
    fake_proc(monkeypatch, [""], {"/proc/meminfo": meminfo})
    assert Profiler().memory_usage() is None


def test_memory_usage_from_meminfo(no_psutil: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(
        monkeypatch, [""], {"/proc/meminfo": "MemTotal:  4000 kB\nMemFree: 10 kB\nMemAvailable:  1000 kB\n"}
    )
    p = Profiler()
    assert p.memory_usage() == 75.0
    assert p.memory_total() == 4000 * 1024


def test_uptime_from_proc(no_psutil: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, [""], {"/proc/uptime": "12345.67 999.0\n"})
    assert Profiler().system_metrics()["uptime"] == 12345.67
    fake_proc(monkeypatch, [""], {"/proc/uptime": "soon\n"})
    assert Profiler().system_metrics()["uptime"] is None


def test_cpu_usage_from_two_proc_stat_samples(no_psutil: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # user nice system idle iowait irq softirq steal: busy 200 of 1000, then 300 of 1200.
    first = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\n"
    later = "cpu  150 0 150 900 0 0 0 0 0 0\ncpu0 150 0 150 900 0 0 0 0 0 0\n"
    fake_proc(monkeypatch, [first, first, later])
    p = Profiler()  # takes the first sample
    assert p.cpu_usage() is None  # no time passed between samples: unknown, not 0
    assert p.cpu_usage() == 50.0


@linux_only
def test_cpu_usage_without_psutil_becomes_a_number(no_psutil: None) -> None:
    p = Profiler()
    first = p.cpu_usage()
    assert first is None or 0 <= first <= 100
    # Wait (bounded) for the kernel's CPU counters to move; no timing is asserted.
    deadline = time.monotonic() + 10
    later = p.cpu_usage()
    while later is None and time.monotonic() < deadline:
        time.sleep(0.05)
        later = p.cpu_usage()
    assert later is not None
    assert 0 <= later <= 100


def test_cpu_usage_with_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc does not answer (macOS, Windows) psutil does; here it is put in by hand."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(profiler_module, "_psutil", psutil)
    p = Profiler()
    for _ in range(2):
        usage = p.cpu_usage()
        assert usage is not None and 0 <= usage <= 100


def test_short_proc_stat_line_is_unknown_not_a_crash(no_psutil: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, ["cpu 1 2\n", "cpu 3 4\n"])
    p = Profiler()
    assert p.cpu_usage() is None
    check_metrics(p.system_metrics())


def test_memory_usage_on_kernels_without_memavailable(no_psutil: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, [""], {"/proc/meminfo": "MemTotal: 4000 kB\nMemFree: 500 kB\nBuffers: 100 kB\n"
                                                     "Cached: 400 kB\n"})
    assert Profiler().memory_usage() == 75.0


def test_unreadable_disk_is_left_out_not_zero(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_disk(path: str) -> Any:
        raise PermissionError("restricted")

    monkeypatch.setattr(profiler_module.shutil, "disk_usage", no_disk)
    specs = Profiler(data_dir=tmp_path).hardware_specs()
    assert "disk_space" not in specs and specs["cpu_cores"] >= 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not shutil.which("taskset"),
                    reason="CPU affinity (Linux, util-linux taskset)")
def test_cores_and_default_slots_are_the_cpus_the_worker_may_use() -> None:
    """A container or `taskset` allows fewer CPUs than the machine has: the slots follow what may be used.

    Before, a worker limited to one CPU of a 2-core machine took 2 tasks at once and reported 2 cores.
    """
    code = ("from retire_cluster.worker.profiler import Profiler; from retire_cluster.worker.config import "
            "WorkerConfig; print(Profiler().hardware_specs()['cpu_cores'], WorkerConfig(device_id='x').slots)")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["1", "1"]
