"""What this device is and how busy it is: register and heartbeat contents.

psutil is used when it imports and works (Termux often cannot build it, and
psutil 7 refuses Android); otherwise the answers come from ``os``,
``platform``, ``shutil`` and ``/proc``. A reading that cannot be made is left
out or reported as None (unknown), never as a made-up 0. Nothing here blocks:
CPU usage is the difference between two samples taken at successive
heartbeats, never a sleep between samples.
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

try:  # optional
    import psutil as _psutil

    _psutil.virtual_memory()
except Exception:  # ImportError, or psutil present but broken on this platform
    _psutil = None

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
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    total = sum(values[:8])
    return total - idle, total


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
        try:
            disk = shutil.disk_usage(self._disk_path()).total
        except OSError:
            disk = 0
        try:
            interfaces = sorted({name for _, name in socket.if_nameindex()})
        except (OSError, AttributeError):
            interfaces = []
        return {
            "cpu_cores": os.cpu_count() or 1,
            "memory_total": self.memory_total(),
            "disk_space": disk,
            "network_interfaces": interfaces,
        }

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
