"""Child processes for task code: one process group, bounded capture, a scratch dir.

Theory of operation. ``python_eval`` and ``command`` run code the worker's
owner did not write, so each runs as a child process that:

- starts as the :mod:`.trampoline`, which sets resource limits and then runs
  the task code;
- is in its own session (``start_new_session``), so killing its process group
  kills what it started too. The group is killed on every exit path: timeout,
  cancel, and also after a normal exit, so nothing outlives the task; on
  Linux, neither does what left the group (``setsid``) but still works in
  the task's scratch directory (:func:`kill_leftovers`);
- gets a scratch directory as cwd, HOME and TMPDIR, and an environment with
  no secrets in it (never the cluster token);
- has its stdout and stderr read as they come, keeping at most
  ``output_limit_bytes`` of each and discarding the rest, so the child never
  blocks on a full pipe and the worker's memory stays bounded.

Once the main child has exited, its pipes are drained for at most
:data:`DRAIN_S`: a grandchild still holding a pipe open must not make the
task wait. ``python_eval`` answers on a separate pipe (``pass_fds``), so what
the expression prints can never corrupt its result; where ``pass_fds`` does
not exist (Windows) the reply goes through a file in the scratch directory.

Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import shutil
import signal
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

__all__ = [
    "DRAIN_S",
    "SWEEP_PASSES",
    "ChildResult",
    "child_env",
    "default_scratch_base",
    "describe_exit",
    "kill_leftovers",
    "make_scratch_dir",
    "prepare_scratch_base",
    "sweep_scratch_dirs",
    "remove_scratch_dir",
    "run_child",
]

#: After the main child exits, how long its pipes may take to reach EOF.
DRAIN_S = 0.5
#: After the group is killed, how long to wait for the main child to be reaped.
REAP_S = 5.0
#: At most this many scans of ``/proc`` per :func:`kill_leftovers` (another only after one that killed).
SWEEP_PASSES = 5
_POSIX = os.name == "posix"

_SAFE_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERMUX_VERSION", "PREFIX", "ANDROID_ROOT",
                  "ANDROID_DATA", "SYSTEMROOT", "PATHEXT")

# -- scratch directories and environment ------------------------------------------


def default_scratch_base() -> Path:
    """``<tmp>/retire-cluster-<uid>``: per user, so two users on one device never share it."""
    user = str(os.getuid()) if hasattr(os, "getuid") else (os.environ.get("USERNAME") or "user")
    return Path(tempfile.gettempdir()) / f"retire-cluster-{user}"


def make_scratch_dir(base: Path) -> Path:
    """A new private (0700) directory under ``base``; the caller removes it.

    ``base`` must be a real directory owned by this user: in a shared /tmp
    someone else could have created it first, or made it a symlink.

    Raises:
        OSError: it cannot be created, or ``base`` is not ours.
    """
    prepare_scratch_base(base)
    return Path(tempfile.mkdtemp(prefix=f"task-{os.getpid()}-", dir=base))


def prepare_scratch_base(base: Path) -> None:
    """Create ``base`` (0700) if needed and check it is a real directory of this user's.

    The worker calls it at start, so a bad --scratch-dir is an error then,
    not a failure of every command and python_eval task later.

    Raises:
        OSError: it cannot be created, or it is not ours.
    """
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise OSError(f"{base} is not a directory owned by this user; remove it or choose another base")


def sweep_scratch_dirs(base: Path) -> Tuple[int, int]:
    """Clean up after workers that are gone (``kill -9``); returns (directories removed, processes killed).

    A scratch directory's name carries the pid of the worker that made it
    (``task-<pid>-...``); those of a live process are kept, and so are names
    without a pid. Before a directory is removed, the processes its task
    left running are killed (:func:`kill_leftovers`): the task's own process
    dies with the worker (PR_SET_PDEATHSIG), but what it started in the
    background does not.
    """
    removed = killed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0, 0
    for entry in entries:
        parts = entry.name.split("-", 2)
        if len(parts) < 3 or parts[0] != "task" or not parts[1].isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        if _alive(int(parts[1])):
            continue
        killed += kill_leftovers(Path(entry.path))
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed, killed


def kill_leftovers(scratch_dir: Path) -> int:
    """SIGKILL this user's processes still working in ``scratch_dir``; returns how many (Linux only).

    A task's processes run with the scratch directory as cwd, HOME and
    TMPDIR, and what they start inherits them: a process whose cwd is in it,
    or whose HOME or TMPDIR is it, was started by that task. The directory is
    private (0700) to this user, and another user's processes cannot be read.

    ``/proc`` is scanned again after any pass that killed something, up to
    :data:`SWEEP_PASSES` times: a leftover may have forked while it was
    being scanned, and a process caught in the middle of an ``exec`` shows
    an empty environment for that moment. Each process is counted once.
    """
    if not os.path.isdir("/proc/self"):
        return 0
    target = os.path.realpath(scratch_dir)
    marks = (b"HOME=" + os.fsencode(target), b"TMPDIR=" + os.fsencode(target))
    own = os.getpid()
    done: Set[int] = set()
    for _ in range(SWEEP_PASSES):
        found = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == own or pid in done or not _works_in(entry.path, target, marks):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours
                continue
            done.add(pid)
            found += 1
        if not found:
            break
    return len(done)


def _works_in(proc_dir: str, target: str, marks: Tuple[bytes, bytes]) -> bool:
    try:
        cwd = os.readlink(os.path.join(proc_dir, "cwd"))
    except OSError:  # another user's process, or gone
        return False
    if cwd == target or cwd.startswith(target + os.sep):
        return True
    try:
        with open(os.path.join(proc_dir, "environ"), "rb") as fh:
            return any(item in marks for item in fh.read().split(b"\0"))
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: keep its directories
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has exited but was not reaped yet (its parent, often init, has not waited for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):  # no /proc (not Linux), or gone meanwhile
        return False


async def remove_scratch_dir(path: Path, *, leftovers: bool = False) -> None:
    """Remove a task's scratch directory in a thread (a big tree must not stall the event loop).

    With ``leftovers`` (a task that ran in child processes), first kill what
    still works in it: the task's process group is dead by now, and this finds
    what left the group (``setsid``, a daemon) but still has the directory as
    cwd, HOME or TMPDIR. It reads /proc (about 1 ms per 64 processes), so a
    plug-in task, which runs in the worker, skips it.
    """
    await asyncio.to_thread(_clear_scratch_dir, path, leftovers)


def _clear_scratch_dir(path: Path, leftovers: bool) -> None:
    if leftovers:
        kill_leftovers(path)
    shutil.rmtree(path, ignore_errors=True)


def child_env(scratch_dir: Optional[Path] = None) -> Dict[str, str]:
    """The environment of task processes: no secrets, only the basics, home in the scratch dir."""
    env = {k: os.environ[k] for k in _SAFE_ENV_KEYS if k in os.environ}
    if "TERMUX_VERSION" in os.environ and "LD_PRELOAD" in os.environ:
        env["LD_PRELOAD"] = os.environ["LD_PRELOAD"]  # termux-exec: makes #!/usr/bin/env work there
    env["PYTHONIOENCODING"] = "utf-8"
    if scratch_dir is not None:
        for key in ("HOME", "TMPDIR", "TMP", "TEMP"):
            env[key] = str(scratch_dir)
    return env


# -- running the child --------------------------------------------------------------


@dataclass
class ChildResult:
    """What the child left: exit status, the captured (capped) output, the reply."""

    returncode: Optional[int]
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    reply: Optional[bytes] = None
    reply_truncated: bool = False
    timed_out: bool = False

    def text(self, which: str) -> str:
        """``stdout`` or ``stderr`` as text; a character cut by the cap is dropped, not mangled."""
        data: bytes = getattr(self, which)
        cut: bool = getattr(self, which + "_truncated")
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=not cut)


def describe_exit(returncode: Optional[int]) -> str:
    """``exit code 3`` or ``exit code -25 (killed by SIGXFSZ: file size limit)``."""
    if returncode is None or returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = {"SIGXCPU": ": CPU time limit", "SIGXFSZ": ": file size limit"}.get(name, "")
    return f"exit code {returncode} (killed by {name}{why})"


class _Keep:
    """Keeps the first ``limit`` bytes of a stream and counts the rest away."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        if len(chunk) > room:
            self.truncated = True


class _Capture(asyncio.SubprocessProtocol):
    """stdout and stderr of the child, each capped; futures for exit and for both pipes' EOF."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.streams = {1: _Keep(limit), 2: _Keep(limit)}
        self.exited: "asyncio.Future[None]" = loop.create_future()
        self.drained: "asyncio.Future[None]" = loop.create_future()
        self._open: Set[int] = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.streams[fd].add(data)

    def pipe_connection_lost(self, fd: int, exc: Optional[Exception]) -> None:
        self._open.discard(fd)
        if not self._open and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class _Reply(asyncio.Protocol):
    """The python_eval reply pipe, capped like the other streams."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.keep = _Keep(limit)
        self.done: "asyncio.Future[None]" = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.keep.add(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _kill_group(transport: asyncio.SubprocessTransport) -> None:
    """SIGKILL the child's whole process group (its session); on Windows the child alone."""
    pid = transport.get_pid()
    if _POSIX:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:  # nobody left in the group
            pass
    elif transport.get_returncode() is None:  # pragma: no cover - Windows
        try:
            transport.kill()
        except OSError:
            pass


async def _wait_some(futures: "List[asyncio.Future[None]]", timeout_s: float) -> None:
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


@dataclass
class _ReplyChannel:
    """Where a python_eval child answers: a pipe fd (POSIX) or a file (elsewhere)."""

    arg: str
    pass_fds: Tuple[int, ...] = ()
    read_fd: Optional[int] = None
    path: Optional[Path] = None
    protocol: Optional[_Reply] = None
    transport: Optional[asyncio.BaseTransport] = field(default=None, repr=False)

    @classmethod
    def open(cls, cwd: Path) -> _ReplyChannel:
        if _POSIX:
            read_fd, write_fd = os.pipe()
            return cls(f"fd:{write_fd}", (write_fd,), read_fd)
        path = cwd / ".retire-cluster-reply.json"  # pragma: no cover - Windows
        return cls(f"file:{path}", path=path)  # pragma: no cover

    def close_write_end(self) -> None:
        for fd in self.pass_fds:
            os.close(fd)
        self.pass_fds = ()

    def close(self) -> None:
        self.close_write_end()
        if self.transport is not None:
            self.transport.close()
        elif self.read_fd is not None:
            os.close(self.read_fd)
        self.read_fd = None

    async def connect(self, limit: int) -> None:
        if self.read_fd is None:
            return
        loop = asyncio.get_running_loop()
        protocol = self.protocol = _Reply(limit, loop)
        pipe = os.fdopen(self.read_fd, "rb", buffering=0)
        self.read_fd = None
        try:
            self.transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
        except BaseException:
            pipe.close()
            raise

    def result(self, limit: int) -> Tuple[Optional[bytes], bool]:
        if self.protocol is not None:
            keep = self.protocol.keep
            return (bytes(keep.data) or None), keep.truncated
        if self.path is not None and self.path.exists():  # pragma: no cover - Windows
            with self.path.open("rb") as fh:
                data = fh.read(limit + 1)
            return data[:limit] or None, len(data) > limit
        return None, False


async def run_child(argv: List[str], *, cwd: Path, env: Dict[str, str], stdin: Optional[bytes] = None,
                    output_limit_bytes: int, reply_limit_bytes: Optional[int] = None,
                    pids: Optional[Set[int]] = None, timeout_s: Optional[float] = None) -> ChildResult:
    """Start ``argv`` in its own session, feed ``stdin``, capture output, and clean up.

    Cancel the call to stop the child (a timeout is the caller's
    ``asyncio.wait_for``): on every way out the whole process group is
    killed and the main child reaped (for at most :data:`REAP_S`).

    Args:
        argv: from :func:`.trampoline.command_argv` or :func:`.trampoline.eval_argv`.
        cwd, env: the scratch directory and :func:`child_env`.
        stdin: bytes to write then close; None gives the child /dev/null.
        output_limit_bytes: the most kept of stdout and of stderr, each.
        reply_limit_bytes: not None opens a reply channel (appended to argv).
        pids: the child's pid is in this set while it runs.
        timeout_s: stop the child after this long and return what it wrote so far,
            with ``timed_out`` set (a task's output up to its timeout is what
            one needs to see why it hung).

    Raises:
        OSError: the process could not be started.
    """
    loop = asyncio.get_running_loop()
    # From now, not from when the child is up: a CPU-bound child then meets its CPU rlimit
    # (SIGXCPU a second later than the timeout: DERIVED_CPU_SLACK_S) after this deadline.
    deadline = None if timeout_s is None else loop.time() + timeout_s
    capture = _Capture(output_limit_bytes, loop)
    channel = _ReplyChannel.open(cwd) if reply_limit_bytes is not None else None
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: capture, *argv, *([channel.arg] if channel else []),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=str(cwd), env=env, start_new_session=True, pass_fds=channel.pass_fds if channel else (),
        )  # fmt: skip
    except BaseException:
        if channel is not None:
            channel.close()
        raise
    pid = transport.get_pid()
    timed_out = False
    if pids is not None:
        pids.add(pid)
    try:
        if channel is not None:
            channel.close_write_end()  # so the reply pipe ends when the child does
            await channel.connect(reply_limit_bytes or 0)
        if stdin is not None:
            writer = transport.get_pipe_transport(0)
            if writer is not None:
                writer.write(stdin)  # type: ignore[attr-defined]
                writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(capture.exited),  # a cancel must not cancel it
                                   None if deadline is None else max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            timed_out = True
            _kill_group(transport)
        # What the main child wrote is in the pipes now; a grandchild may hold them open.
        waits = [capture.drained]
        if channel is not None and channel.protocol is not None:
            waits.append(channel.protocol.done)
        await _wait_some(waits, DRAIN_S)
    finally:
        _kill_group(transport)
        try:
            await _wait_some([capture.exited], REAP_S)
        finally:
            transport.close()
            if channel is not None:
                channel.close()
            if pids is not None:
                pids.discard(pid)
    out, err = capture.streams[1], capture.streams[2]
    result = ChildResult(transport.get_returncode(), bytes(out.data), bytes(err.data), out.truncated, err.truncated,
                         timed_out=timed_out)
    if channel is not None:
        result.reply, result.reply_truncated = channel.result(reply_limit_bytes or 0)
    return result
