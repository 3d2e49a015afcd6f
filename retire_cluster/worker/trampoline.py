"""What runs in a task's child process before the task itself: the trampoline.

Resource limits cannot be set with ``preexec_fn``: it runs Python code
between fork and exec, which can deadlock when the worker has threads (and
asyncio's getaddrinfo uses a thread pool). So the child is a fresh Python
(``python -I -c SOURCE <spec> ...``) that sets its own limits first, then
``execvp``s the command (``command``) or evaluates the expression
(``python_eval``, answering on a reply channel, never on stdout). On Linux it
also asks to be SIGKILLed when the worker dies (PR_SET_PDEATHSIG), so a
``kill -9`` of the worker does not leave the task's process running; what
that process started in the background is killed by the next worker to
start on the device (sandbox.sweep_scratch_dirs).

The limits (:class:`Limits`) are set as both soft and hard values, so the
task cannot raise them again; RLIMIT_CPU gets one more second of hard limit
(SIGXCPU first, then SIGKILL). Where ``resource`` does not exist (Windows)
the child runs without limits. The sources below run on the worker's own
Python, so they keep to Python 3.9 syntax.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..protocol.codec import dumps

__all__ = ["Limits", "command_argv", "eval_argv"]

# Runs in the child before anything else. Kept to Python 3.9 syntax; any
# failure to set a limit is ignored (best effort: a platform may refuse one).
_PRELUDE = r"""
import json, os, sys
def _apply(spec):
    if sys.platform.startswith("linux") and spec.get("parent"):
        try:
            import ctypes
            _ul = ctypes.c_ulong
            ctypes.CDLL(None, use_errno=True).prctl(1, _ul(9), _ul(0), _ul(0), _ul(0))  # PR_SET_PDEATHSIG, KILL
        except Exception:
            pass
        if os.getppid() != spec["parent"]:
            os._exit(137)  # the worker died before the line above
    try:
        import resource
    except ImportError:
        return
    for name, pair in spec["rlimits"].items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        soft, hard = pair
        try:
            cur_hard = resource.getrlimit(which)[1]
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass
"""

_EXEC_SOURCE = _PRELUDE + r"""
_apply(json.loads(sys.argv[1]))
import signal
for _name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):  # Python ignores these; exec would keep them ignored
    if hasattr(signal, _name):
        signal.signal(getattr(signal, _name), signal.SIG_DFL)
_argv = sys.argv[2:]
try:
    os.execvp(_argv[0], _argv)
except OSError as exc:
    sys.stderr.write("retire-cluster: cannot run %r: %s\n" % (_argv[0], exc.strerror or exc))
    sys.stderr.flush()
    os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""

_EVAL_SOURCE = _PRELUDE + r"""
_apply(json.loads(sys.argv[1]))
_channel = sys.argv[2]
if _channel.startswith("fd:"):
    _fd = int(_channel[3:])
    os.set_inheritable(_fd, False)  # programs the expression starts do not get the reply pipe
    _reply = os.fdopen(_fd, "wb")
else:
    _reply = open(_channel[5:], "wb")
_request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
try:
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
except Exception:
    pass

if hasattr(sys, "set_int_max_str_digits"):  # 3.11+: 2**100000 is a result, not a ValueError
    sys.set_int_max_str_digits(0)

def _clip(text, limit):
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode("utf-8"), False
    return raw[:limit].decode("utf-8", "ignore"), True

_reply.write(b"\x1e")  # STARTED: from here on, an end without an answer is the expression's own doing
_reply.flush()
try:
    _value = eval(compile(_request["expression"], "<expression>", "eval"), {"__builtins__": __builtins__}, {})
    _text, _cut = _clip(str(_value), _request["limit"])
    _result = {"ok": True, "output": _text, "truncated": _cut}
except BaseException as _exc:
    try:
        import traceback
        # From the expression on: the frame of this script's eval() line means nothing to its author.
        traceback.print_exception(type(_exc), _exc, _exc.__traceback__.tb_next)
    except BaseException:
        pass
    try:
        _message = "%s: %s" % (type(_exc).__name__, _exc)
    except BaseException:
        _message = type(_exc).__name__
    _result = {"ok": False, "error": _clip(_message, _request["error_limit"])[0]}
try:
    _reply.write(json.dumps(_result, ensure_ascii=False).encode("utf-8", "backslashreplace"))
    _reply.close()
finally:
    for _stream in (sys.stdout, sys.stderr):
        try:
            _stream.flush()
        except BaseException:
            pass
    os._exit(0)  # no waiting for threads or atexit hooks the expression left behind
"""


#: CPU seconds added to a CPU limit derived from the task's timeout: the wall-clock timeout, watched
#: by the worker, ends a busy task first and reports it as "timeout".
DERIVED_CPU_SLACK_S = 1


@dataclass(frozen=True)
class Limits:
    """Resource limits for a task's process (and what it starts; they are inherited).

    A limit of 0 or None is not set. ``cpu_s`` None means the task's timeout
    rounded up plus :data:`DERIVED_CPU_SLACK_S`, so a busy loop ends even if
    the wall clock is not watched. The slack lets the worker's own timeout
    come first when its event loop wakes late, so such a task ends "timeout",
    not "failed" by SIGXCPU.

    Attributes:
        cpu_s: CPU seconds (RLIMIT_CPU); SIGXCPU at the limit, SIGKILL a second later.
        memory_bytes: address space (RLIMIT_AS); allocations beyond it fail.
        open_files: file descriptors (RLIMIT_NOFILE).
        file_size_bytes: the largest file it may write (RLIMIT_FSIZE).
    """

    cpu_s: Optional[float] = None
    memory_bytes: Optional[int] = 1024**3
    open_files: Optional[int] = 256
    file_size_bytes: Optional[int] = 64 * 1024**2

    def __post_init__(self) -> None:
        for name in ("cpu_s", "memory_bytes", "open_files", "file_size_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value >= 0 or math.isinf(value)):
                raise ValueError(f"Limits.{name} must be a finite number >= 0 or None, not {value!r}.")

    def rlimits(self, timeout_s: float) -> Dict[str, Tuple[int, int]]:
        """The (soft, hard) pairs by ``resource`` constant name, for a task of ``timeout_s``."""
        derived = self.cpu_s is None
        cpu = timeout_s if derived else self.cpu_s
        out: Dict[str, Tuple[int, int]] = {"RLIMIT_CORE": (0, 0)}
        if cpu and math.isfinite(cpu) and cpu > 0:
            seconds = max(1, math.ceil(cpu)) + (DERIVED_CPU_SLACK_S if derived else 0)
            out["RLIMIT_CPU"] = (seconds, seconds + 1)
        for name, value in (("RLIMIT_AS", self.memory_bytes), ("RLIMIT_NOFILE", self.open_files),
                            ("RLIMIT_FSIZE", self.file_size_bytes)):
            if value:
                out[name] = (int(value), int(value))
        return out


def _spec(limits: Limits, timeout_s: float) -> str:
    return dumps({"rlimits": limits.rlimits(timeout_s), "parent": os.getpid()}).decode("utf-8")


def command_argv(argv: List[str], limits: Limits, timeout_s: float) -> List[str]:
    """The process to start for ``command``: the trampoline, which execs ``argv``."""
    return [sys.executable, "-I", "-c", _EXEC_SOURCE, _spec(limits, timeout_s), *argv]


#: The first byte of a python_eval reply (RFC 7464's record separator, never JSON's first byte): the
#: child got as far as evaluating. A child that ends without an answer after it was ended by the
#: expression (``os._exit``, a signal it sent itself): the task failed, not the device.
STARTED = b"\x1e"


def eval_argv(limits: Limits, timeout_s: float) -> List[str]:
    """The process to start for ``python_eval``; :func:`.sandbox.run_child` appends the reply channel.

    The child reads ``{"expression", "limit", "error_limit"}`` as JSON on
    stdin, writes :data:`STARTED` to the reply channel once its sandbox is set
    up and just before it evaluates, then answers ``{"ok", "output",
    "truncated"}`` or ``{"ok", "error"}`` as JSON after it.
    """
    return [sys.executable, "-I", "-c", _EVAL_SOURCE, _spec(limits, timeout_s)]
