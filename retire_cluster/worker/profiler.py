"""What this device is and how busy it is: register and heartbeat contents.

Where ``/proc`` answers (Linux and Android), the answers come from it and
from ``os``, ``platform`` and ``shutil``, as psutil's own would on Linux:
psutil is not imported there (it would cost the worker almost 1 MiB at rest).
Elsewhere psutil is used when it imports and works. A reading that cannot be
made is left out or reported as None (unknown), never as a made-up 0.
Nothing here blocks: CPU usage is the difference between two samples taken
at successive heartbeats, never a sleep between samples.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

#: /proc has what psutil would read on Linux: CPU times, memory and (sysfs) the battery.
PROC_ANSWERS = all(os.access(path, os.R_OK) for path in ("/proc/stat", "/proc/meminfo"))

_psutil: Any = None
if not PROC_ANSWERS:
    try:  # optional
        import psutil

        psutil.virtual_memory()
        _psutil = psutil
    except Exception:  # ImportError, or psutil present but broken on this platform
        pass

__all__ = ["Profiler", "detect_platform"]


def detect_platform() -> str:
    """``linux``, ``android``, ``darwin``, ``windows``, ... (Termux reports android)."""
    if sys.platform.startswith("linux"):
        if "ANDROID_ROOT" in os.environ or "TERMUX_VERSION" in os.environ or hasattr(sys, "getandroidapilevel"):
            return "android"
        return "linux"
    if sys.platform.startswith("win"):
        return "windows"
    return sys.platform


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _meminfo() -> Dict[str, int]:
    text = _read("/proc/meminfo") or ""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _cpu_times() -> Optional[Tuple[float, float]]:
    """(busy, total) jiffies from /proc/stat, or None."""
    text = _read("/proc/stat")
    if not text:
        return None
    first = text.splitlines()[0].split()
    if not first or first[0] != "cpu":
        return None
    try:
        values = [float(v) for v in first[1:]]
    except ValueError:
        return None
    if len(values) < 4:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    total = sum(values[:8])
    return total - idle, total



def usable_cpus() -> int:
    """The CPUs this process may run on: a container or `taskset` may allow fewer than the machine has."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; not macOS, Windows or every Android
    if affinity is not None:
        try:
            return max(1, len(affinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1

class Profiler:
    """Collects device facts once and metrics at each heartbeat.

    Args:
        role: the role advertised in device_info.
        data_dir: the disk whose size and use are reported.
        extra_capabilities: added to the detected ones.
    """

    def __init__(self, role: str = "worker", data_dir: Optional[Path] = None,
                 extra_capabilities: Tuple[str, ...] = ()) -> None:
        self.role = role
        self.data_dir = Path(data_dir) if data_dir is not None else Path.home()
        self.extra_capabilities = tuple(extra_capabilities)
        self._last_cpu = _cpu_times()
        self._started = time.monotonic()
        if _psutil is not None:
            try:
                _psutil.cpu_percent(None)  # prime the non-blocking counter
            except Exception:
                pass

    def _disk_path(self) -> str:
        path = self.data_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        return str(path)

    def device_info(self) -> Dict[str, Any]:
        return {
            "hostname": socket.gethostname(),
            "platform": detect_platform(),
            "architecture": platform.machine() or "unknown",
            "python_version": platform.python_version(),
            "role": self.role,
        }

    def memory_total(self) -> int:
        if _psutil is not None:
            try:
                return int(_psutil.virtual_memory().total)
            except Exception:
                pass
        total = _meminfo().get("MemTotal")
        if total:
            return total
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 0

    def hardware_specs(self) -> Dict[str, Any]:
        """cpu_cores, memory_total, disk_space (left out when unknown), network_interfaces."""
        try:
            interfaces = sorted({name for _, name in socket.if_nameindex()})
        except (OSError, AttributeError):
            interfaces = []
        specs: Dict[str, Any] = {
            "cpu_cores": usable_cpus(),
            "memory_total": self.memory_total(),
            "network_interfaces": interfaces,
        }
        try:
            specs["disk_space"] = shutil.disk_usage(self._disk_path()).total
        except OSError:
            pass
        return specs

    def capabilities(self) -> List[str]:
        caps = ["computational"]
        if detect_platform() == "android":
            caps.append("mobile_specific")
        if shutil.which("git"):
            caps.append("git")
        caps.extend(c for c in self.extra_capabilities if c not in caps)
        return caps

    def cpu_usage(self) -> Optional[float]:
        """Percent since the previous call (None the first time without psutil)."""
        if _psutil is not None:
            try:
                return float(_psutil.cpu_percent(None))
            except Exception:
                pass
        now = _cpu_times()
        last, self._last_cpu = self._last_cpu, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return round(100.0 * (now[0] - last[0]) / (now[1] - last[1]), 1)

    def memory_usage(self) -> Optional[float]:
        if _psutil is not None:
            try:
                return float(_psutil.virtual_memory().percent)
            except Exception:
                pass
        info = _meminfo()
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
        if avail is None and "MemFree" in info:  # kernels before 3.14 (old phones)
            avail = info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
        if not total or avail is None:
            return None
        return round(100.0 * (total - avail) / total, 1)

    def system_metrics(self) -> Dict[str, Any]:
        metrics: Dict[str, Any] = {
            "cpu_usage": self.cpu_usage(),
            "memory_usage": self.memory_usage(),
        }
        try:
            usage = shutil.disk_usage(self._disk_path())
            metrics["disk_usage"] = round(100.0 * usage.used / usage.total, 1) if usage.total else None
        except OSError:
            metrics["disk_usage"] = None
        try:
            metrics["load_average"] = [round(x, 2) for x in os.getloadavg()]
        except (OSError, AttributeError):
            metrics["load_average"] = None
        uptime = _read("/proc/uptime")
        try:
            metrics["uptime"] = float(uptime.split()[0]) if uptime else None
        except (ValueError, IndexError):
            metrics["uptime"] = None
        metrics["worker_uptime"] = round(time.monotonic() - self._started, 1)
        return metrics


# -- battery -------------------------------------------------------------------


def _number(value: object, lo: float, hi: float) -> Optional[float]:
    """A float within [lo, hi], or None for anything missing or implausible."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if number != number or not lo <= number <= hi:  # NaN or out of range
        return None
    return number


def battery_from_sysfs(root: str = "/sys/class/power_supply") -> Dict[str, Any]:
    """Battery percent, charging and temperature from Linux sysfs (Android too)."""
    out: Dict[str, Any] = {}
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return out
    for name in names:
        base = os.path.join(root, name)
        kind = (_read(os.path.join(base, "type")) or "").strip().lower()
        if kind != "battery":
            continue
        out["percent"] = _number((_read(os.path.join(base, "capacity")) or "").strip(), 0, 100)
        status = (_read(os.path.join(base, "status")) or "").strip().lower()
        if status in ("charging", "full"):
            out["charging"] = True
        elif status in ("discharging", "not charging"):
            out["charging"] = False
        temp = _number((_read(os.path.join(base, "temp")) or "").strip(), -400, 1500)
        out["temperature"] = None if temp is None else temp / 10.0
        break
    return out


def battery_from_termux(text: str) -> Dict[str, Any]:
    """Parse the JSON printed by ``termux-battery-status``."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    status = str(data.get("status", "")).upper()
    plugged = str(data.get("plugged", "")).upper()
    charging: Optional[bool] = None
    if status in ("CHARGING", "FULL") or plugged.startswith("PLUGGED"):
        charging = True
    elif status in ("DISCHARGING", "NOT_CHARGING") or plugged == "UNPLUGGED":
        charging = False
    return {
        "percent": _number(data.get("percentage"), 0, 100),
        "charging": charging,
        "temperature": _number(data.get("temperature"), -40, 150),
    }


def battery_from_psutil() -> Dict[str, Any]:
    if _psutil is None:
        return {}
    try:
        info = _psutil.sensors_battery()
    except Exception:  # not supported on this platform
        return {}
    if info is None:
        return {}
    return {"percent": _number(info.percent, 0, 100), "charging": bool(info.power_plugged)
            if info.power_plugged is not None else None}


async def read_battery(sysfs_root: str = "/sys/class/power_supply",
                       termux_command: str = "termux-battery-status") -> Dict[str, Any]:
    """``{"percent", "charging", "temperature"}``, each None when unknown.

    Sources in order: psutil, sysfs, termux-battery-status (run without
    blocking, at most 5 s). Later sources fill what earlier ones left unknown.
    """
    import asyncio

    merged: Dict[str, Any] = {"percent": None, "charging": None, "temperature": None}
    for source in (battery_from_psutil(), battery_from_sysfs(sysfs_root)):
        for key, value in source.items():
            if merged.get(key) is None and value is not None:
                merged[key] = value
    if None in merged.values() and shutil.which(termux_command):
        try:
            proc = await asyncio.create_subprocess_exec(
                termux_command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 5.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                out = b""
            for key, value in battery_from_termux(out.decode("utf-8", "replace")).items():
                if merged.get(key) is None and value is not None:
                    merged[key] = value
        except OSError:
            pass
    return merged


# -- CPU used by the owner (everything but our own task processes) -------------------


def _proc_jiffies(pid: int) -> Optional[float]:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        fields = text.rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime are fields 14-17 (1-based) of stat
        return float(fields[11]) + float(fields[12]) + float(fields[13]) + float(fields[14])
    except (IndexError, ValueError):
        return None


class OwnerCpu:
    """Percent of the whole machine's CPU used by anything but our task processes.

    Call :meth:`sample` with the pids of our running tasks; it compares with the
    previous call. None when /proc cannot tell.
    """

    def __init__(self) -> None:
        self._last_total: Optional[Tuple[float, float]] = _cpu_times()
        self._last_ours: Dict[int, float] = {}

    def sample(self, our_pids: List[int]) -> Optional[float]:
        now = _cpu_times()
        ours_now = {pid: j for pid in our_pids for j in [_proc_jiffies(pid)] if j is not None}
        last, self._last_total = self._last_total, now
        last_ours, self._last_ours = self._last_ours, ours_now
        if now is None or last is None or now[1] <= last[1]:
            return None
        busy = now[0] - last[0]
        ours = sum(max(0.0, j - last_ours.get(pid, j)) for pid, j in ours_now.items())
        return round(max(0.0, 100.0 * (busy - ours) / (now[1] - last[1])), 1)
