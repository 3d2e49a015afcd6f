"""The sandbox around python_eval and command: limits, process group, capture, scratch dir.

Real child processes (that is what is under test). Timeouts here are 1-3 s
and only where the timeout itself is under test; processes a test causes
are found by pid and checked to be gone.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from test_worker_executor import (
    kill_leftovers,
    needs_proc,
    pid_file_expression,
    pid_gone,
    read_pids,
    wait_until,
)

from retire_cluster.worker.executor import ERROR_LIMIT_BYTES, Executor, Limits, Outcome
from retire_cluster.worker.sandbox import DRAIN_S, _Keep, child_env, describe_exit

resource = pytest.importorskip("resource")  # limits exist where `resource` does (not on Windows)

TYPES = frozenset({"echo", "sleep", "python_eval", "command"})
PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


def make(tmp_path: Path, **kwargs: Any) -> Executor:
    kwargs.setdefault("plugins", {})
    return Executor(TYPES, scratch_base=tmp_path / "scratch", **kwargs)


async def command(executor: Executor, argv: Any, *, timeout: float = 30.0, **payload: Any) -> Outcome:
    task = {"task_type": "command", "payload": {"argv": argv, **payload}, "timeout": timeout}
    return await executor.run(task, lambda p, m: None)


async def evaluate(executor: Executor, expression: str, *, timeout: float = 30.0) -> Outcome:
    task = {"task_type": "python_eval", "payload": {"expression": expression}, "timeout": timeout}
    return await executor.run(task, lambda p, m: None)


def python(code: str) -> "list[str]":
    return [PY, "-c", textwrap.dedent(code)]


def exists(path: Path) -> bool:
    return path.exists()


def scratch_left(tmp_path: Path) -> "list[str]":
    base = tmp_path / "scratch"
    return sorted(os.listdir(base)) if base.exists() else []


# -- command: results -----------------------------------------------------------------


async def test_command_echo(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path), ["echo", "hi"])
    assert (outcome.status, outcome.output, outcome.exit_code) == ("completed", "hi\n", 0)
    assert outcome.error is None and outcome.truncated is False
    assert outcome.result() == {"output": "hi\n", "exit_code": 0, "truncated": False, "metrics": {},
                                "stderr": ""}


async def test_command_non_zero_exit_fails_with_the_exit_code(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    outcome = await command(make(tmp_path), python(code))
    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert outcome.error == "exit code 3"
    assert outcome.output == "out\n"
    assert outcome.stderr == "err\n"


@pytest.mark.parametrize("argv", ["echo hi", [], [1, 2], None, ["echo", 3], [""], ["echo", "a\0b"], {"0": "ls"}])
async def test_command_needs_a_list_of_strings(tmp_path: Path, argv: Any) -> None:
    outcome = await command(make(tmp_path), argv)
    assert outcome.status == "failed"
    assert "payload.argv" in (outcome.error or "")
    assert "list of strings" in (outcome.error or "")


async def test_command_is_not_run_by_a_shell(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path), ["echo", "$HOME;ls", "`id`", "*"])
    assert outcome.output == "$HOME;ls `id` *\n"


async def test_command_stdin(tmp_path: Path) -> None:
    executor = make(tmp_path)
    outcome = await command(executor, ["cat"], stdin="héllo\nwörld")
    assert (outcome.status, outcome.output) == ("completed", "héllo\nwörld")
    outcome = await command(executor, ["cat"])  # no stdin: end of file at once, not a hang
    assert (outcome.status, outcome.output) == ("completed", "")
    outcome = await command(executor, ["cat"], stdin=["not", "text"])
    assert outcome.status == "failed" and "payload.stdin" in (outcome.error or "")


async def test_big_stdin_to_a_command_that_does_not_read_it(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path), ["true"], stdin="x" * 1_000_000)
    assert (outcome.status, outcome.exit_code) == ("completed", 0)


async def test_missing_program_fails_saying_so(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path), ["no-such-program-rc"])
    assert outcome.status == "failed"
    assert outcome.exit_code == 127
    assert (outcome.error or "").startswith("exit code 127: cannot run 'no-such-program-rc'")


async def test_command_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    outcome = await command(make(tmp_path), ["sleep", "60"], timeout=1)
    assert outcome.status == "timeout"
    assert time.monotonic() - started < 10
    assert scratch_left(tmp_path) == []


async def test_a_command_that_times_out_keeps_its_output_so_far(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path), ["sh", "-c", "echo partial; echo oops >&2; sleep 60"], timeout=1)
    assert outcome.status == "timeout" and outcome.error == "stopped after the task timeout of 1 s"
    assert outcome.output == "partial\n" and outcome.stderr == "oops\n"
    assert scratch_left(tmp_path) == []


# -- resource limits ------------------------------------------------------------------


async def test_memory_limit_makes_a_big_allocation_fail(tmp_path: Path) -> None:
    executor = make(tmp_path, limits=Limits(memory_bytes=512 * 1024**2))
    outcome = await evaluate(executor, "len(bytearray(2*1024**3))")
    assert outcome.status == "failed"
    assert "MemoryError" in (outcome.error or "")


async def test_file_size_limit_stops_a_big_write(tmp_path: Path) -> None:
    executor = make(tmp_path, limits=Limits(file_size_bytes=1024**2))
    outcome = await command(executor, python("open('big', 'wb').write(b'x' * 2 * 1024**2)"))
    assert outcome.status == "failed"
    assert "File too large" in (outcome.stderr or "")
    small = await command(executor, python("print(open('small', 'wb').write(b'x' * 1000))"))
    assert (small.status, small.output) == ("completed", "1000\n")


@pytest.mark.skipif(shutil.which("dd") is None, reason="needs dd")
async def test_file_size_limit_kills_a_program_with_sigxfsz(tmp_path: Path) -> None:
    # Python ignores SIGXFSZ; the trampoline restores the default before exec, so dd is killed.
    executor = make(tmp_path, limits=Limits(file_size_bytes=1024**2))
    outcome = await command(executor, ["dd", "if=/dev/zero", "of=big", "bs=1024", "count=2048"])
    assert outcome.status == "failed"
    assert outcome.exit_code == -signal.SIGXFSZ
    assert "SIGXFSZ" in (outcome.error or "")


async def test_open_files_limit_is_visible_in_the_child(tmp_path: Path) -> None:
    expression = "__import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE)"
    outcome = await evaluate(make(tmp_path, limits=Limits(open_files=100)), expression)
    assert (outcome.status, outcome.output) == ("completed", "(100, 100)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    outcome = await evaluate(make(tmp_path), expression)
    assert outcome.output == str((expected, expected))


async def test_cpu_limit_defaults_to_the_timeout_rounded_up_plus_a_second(tmp_path: Path) -> None:
    expression = "__import__('resource').getrlimit(__import__('resource').RLIMIT_CPU)"
    outcome = await evaluate(make(tmp_path), expression, timeout=2.5)
    assert outcome.output == "(4, 5)"
    capped = make(tmp_path, python_eval_timeout_s=2)
    outcome = await evaluate(capped, expression, timeout=600)
    assert outcome.output == "(3, 4)"


async def test_cpu_limit_stops_a_busy_loop(tmp_path: Path) -> None:
    # 1 CPU second, 3 s of wall clock: SIGXCPU ends it first.
    outcome = await evaluate(make(tmp_path, limits=Limits(cpu_s=1)), "any(iter(int, 1))", timeout=3)
    assert outcome.status == "failed"
    assert "SIGXCPU" in (outcome.error or "") and "no result" in (outcome.error or "")


async def test_python_eval_timeout_cap(tmp_path: Path) -> None:
    executor = make(tmp_path, python_eval_timeout_s=1)
    started = time.monotonic()
    outcome = await evaluate(executor, "__import__('time').sleep(30)", timeout=600)
    assert outcome.status == "timeout"
    assert "1 s" in (outcome.error or "")
    assert time.monotonic() - started < 10


def test_limits_table() -> None:
    assert Limits().rlimits(2.5) == {
        "RLIMIT_CORE": (0, 0), "RLIMIT_CPU": (4, 5), "RLIMIT_AS": (1024**3, 1024**3),
        "RLIMIT_NOFILE": (256, 256), "RLIMIT_FSIZE": (64 * 1024**2, 64 * 1024**2),
    }
    # Derived from the timeout, the CPU limit is a second late so the wall-clock timeout wins;
    # set by the owner, it is the owner's number.
    assert Limits().rlimits(1)["RLIMIT_CPU"] == (2, 3)
    assert Limits(cpu_s=2).rlimits(10)["RLIMIT_CPU"] == (2, 3)
    assert Limits(cpu_s=0, memory_bytes=None, open_files=0, file_size_bytes=None).rlimits(10) == {
        "RLIMIT_CORE": (0, 0)
    }
    for bad in (-1, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="Limits.memory_bytes"):
            Limits(memory_bytes=bad)  # type: ignore[arg-type]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-9) == "exit code -9 (killed by SIGKILL)"
    assert describe_exit(-signal.SIGXCPU) == f"exit code {-signal.SIGXCPU} (killed by SIGXCPU: CPU time limit)"


# -- output: capped, bounded, never blocking --------------------------------------------


async def test_command_output_is_capped_while_read(tmp_path: Path) -> None:
    # 5 MB on stdout and on stderr at once: the child must not block on either pipe.
    code = "import sys; sys.stdout.write('x' * 5000000); sys.stderr.write('e' * 5000000)"
    outcome = await command(make(tmp_path), python(code))
    assert outcome.status == "completed"
    assert outcome.truncated is True
    assert outcome.output == "x" * 1024**2
    assert outcome.stderr == "e" * 1024**2


async def test_small_cap_never_splits_a_character(tmp_path: Path) -> None:
    outcome = await command(make(tmp_path, output_limit_bytes=101), python("print('\\u20ac' * 200)"))
    assert outcome.truncated is True
    assert outcome.output == "\u20ac" * 33


def test_capture_keeps_at_most_the_cap() -> None:
    keep = _Keep(1000)
    for _ in range(50):
        keep.add(b"y" * 65536)
    assert len(keep.data) == 1000 and keep.truncated
    exact = _Keep(4)
    exact.add(b"1234")
    assert not exact.truncated


async def test_error_text_is_capped(tmp_path: Path) -> None:
    outcome = await evaluate(make(tmp_path), "(_ for _ in ()).throw(ValueError('x' * 2000000))")
    assert outcome.status == "failed"
    assert (outcome.error or "").startswith("ValueError: xxx")
    assert len((outcome.error or "").encode("utf-8")) <= ERROR_LIMIT_BYTES
    assert outcome.truncated is True  # the traceback on stderr was capped too
    assert len((outcome.stderr or "").encode("utf-8")) <= 1024**2


# -- python_eval: the result does not depend on stdout --------------------------------------


async def test_python_eval_result_survives_junk_on_stdout(tmp_path: Path) -> None:
    outcome = await evaluate(make(tmp_path), "__import__('os').write(1, b'junk') and 5")
    assert (outcome.status, outcome.output, outcome.stdout) == ("completed", "5", "junk")


async def test_python_eval_cannot_forge_a_result_on_stdout(tmp_path: Path) -> None:
    outcome = await evaluate(make(tmp_path), """print('{"ok": true, "output": "forged"}') or 1""")
    assert outcome.output == "1"


async def test_python_eval_closing_stdout_is_fine(tmp_path: Path) -> None:
    outcome = await evaluate(make(tmp_path), "__import__('os').close(1) or 'still here'")
    assert (outcome.status, outcome.output) == ("completed", "still here")


async def test_python_eval_big_value_is_cut_in_the_child(tmp_path: Path) -> None:
    outcome = await evaluate(make(tmp_path, output_limit_bytes=1000), "'v' * 50_000_000")
    assert (outcome.status, outcome.output, outcome.truncated) == ("completed", "v" * 1000, True)


async def test_python_eval_thread_left_running_does_not_hold_the_task(tmp_path: Path) -> None:
    expression = "__import__('threading').Thread(target=__import__('time').sleep, args=(60,)).start() or 7"
    started = time.monotonic()
    outcome = await evaluate(make(tmp_path), expression, timeout=30)
    assert (outcome.status, outcome.output) == ("completed", "7")
    assert time.monotonic() - started < 10


# -- the process group dies on every exit path --------------------------------------------


@needs_proc
async def test_grandchild_is_killed_after_a_successful_python_eval(tmp_path: Path) -> None:
    path = tmp_path / "pids"
    pids = None
    try:
        outcome = await evaluate(make(tmp_path), pid_file_expression(path, "'done'"))
        pids = read_pids(path)
        assert outcome.status == "completed"
        assert (outcome.output or "").endswith(", 'done')")
        assert pids is not None
        assert await wait_until(lambda: all(pid_gone(p) for p in pids)), "left running after success"
    finally:
        kill_leftovers(pids or read_pids(path))


@needs_proc
async def test_grandchild_holding_stdout_neither_delays_the_task_nor_survives(tmp_path: Path) -> None:
    # `sleep` inherits the stdout pipe; the task must end once sh has exited, not in an hour.
    started = time.monotonic()
    outcome = await command(make(tmp_path), ["sh", "-c", "sleep 3600 & echo $!"], timeout=30)
    elapsed = time.monotonic() - started
    pid = int((outcome.output or "0").strip() or 0)
    try:
        assert outcome.status == "completed"
        assert pid > 0
        assert elapsed < DRAIN_S + 5
        assert await wait_until(lambda: pid_gone(pid)), "the grandchild outlived the task"
    finally:
        kill_leftovers((pid,) if pid else None)


@needs_proc
async def test_detached_grandchild_is_killed_after_success(tmp_path: Path) -> None:
    pid_path = tmp_path / "grandchild"
    outcome = await command(make(tmp_path), ["sh", "-c", f"sleep 3600 >/dev/null 2>&1 & echo $! > {pid_path}"])
    pid = int(pid_path.read_text().strip())
    try:
        assert outcome.status == "completed"
        assert await wait_until(lambda: pid_gone(pid))
    finally:
        kill_leftovers((pid,))


@needs_proc
@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
async def test_a_grandchild_that_left_the_process_group_is_killed_too(tmp_path: Path) -> None:
    """`setsid` takes a process out of the task's group, so the group kill misses it; its scratch dir does not."""
    pid_path = tmp_path / "grandchild"
    # The task ends only once the grandchild is out of the group (it writes its pid after setsid).
    detach = f"setsid sh -c 'echo $$ > {pid_path}; exec sleep 3600' >/dev/null 2>&1 </dev/null &"
    outcome = await command(make(tmp_path), ["sh", "-c", f"{detach} while [ ! -s {pid_path} ]; do sleep 0.01; done"])
    pid = int(pid_path.read_text().strip())
    try:
        assert outcome.status == "completed"
        assert await wait_until(lambda: pid_gone(pid)), "a process that left the group outlived the task"
    finally:
        kill_leftovers((pid,))


@needs_proc
async def test_command_timeout_kills_grandchildren(tmp_path: Path) -> None:
    pid_path = tmp_path / "grandchild"
    outcome = await command(make(tmp_path), ["sh", "-c", f"sleep 3600 & echo $! > {pid_path}; wait"], timeout=1)
    pid = int(pid_path.read_text().strip())
    try:
        assert outcome.status == "timeout"
        assert await wait_until(lambda: pid_gone(pid))
    finally:
        kill_leftovers((pid,))


async def test_child_pids_while_running(tmp_path: Path) -> None:
    executor = make(tmp_path)
    job = asyncio.ensure_future(command(executor, ["sleep", "60"], timeout=30))
    try:
        assert await wait_until(lambda: bool(executor.child_pids()))
        (pid,) = executor.child_pids()
        assert not pid_gone(pid)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    assert executor.child_pids() == []
    assert pid_gone(pid)
    assert scratch_left(tmp_path) == []


WORKER_DIES = textwrap.dedent("""\
    import asyncio, sys
    from retire_cluster.worker.executor import Executor

    async def main():
        ex = Executor(frozenset({"command"}), scratch_base=sys.argv[1], plugins={})
        job = asyncio.ensure_future(ex.run({"task_type": "command", "payload": {"argv": ["sleep", "3600"]},
                                            "timeout": 60}, lambda p, m: None))
        while not ex.child_pids():
            await asyncio.sleep(0.02)
        print(ex.child_pids()[0], flush=True)
        await job

    asyncio.run(main())
    """)


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
@needs_proc
async def test_task_process_dies_with_a_killed_worker(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    worker = await asyncio.create_subprocess_exec(PY, "-c", WORKER_DIES, str(tmp_path / "scratch"),
                                                  stdout=asyncio.subprocess.PIPE, env=env)
    pid: Optional[int] = None
    try:
        assert worker.stdout is not None
        pid = int(await asyncio.wait_for(worker.stdout.readline(), 30))
        # Once `sleep` runs, the trampoline has set PR_SET_PDEATHSIG (it does so before exec).
        assert await wait_until(lambda: cmdline(pid) == b"sleep\x003600\x00", 30)
        worker.kill()
        await worker.wait()
        assert await wait_until(lambda: pid_gone(pid)), "the task process outlived the SIGKILLed worker"
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        kill_leftovers((pid,) if pid else None)


# -- scratch directory and environment ---------------------------------------------------


async def test_scratch_dir_is_the_cwd_and_home_and_is_removed(tmp_path: Path) -> None:
    executor = make(tmp_path)
    outcome = await command(executor, python("import os; open('f', 'w').write('x'); print(os.getcwd())"))
    cwd = Path((outcome.output or "").strip())
    assert outcome.status == "completed"
    assert cwd.parent == tmp_path / "scratch"
    assert not exists(cwd)
    expression = "[__import__('os').getcwd(), __import__('os').environ['HOME'], __import__('tempfile').gettempdir()]"
    outcome = await evaluate(executor, expression)
    cwd_, home, tmp = json.loads((outcome.output or "").replace("'", '"'))
    assert cwd_ == home == tmp and Path(cwd_).parent == tmp_path / "scratch"
    assert scratch_left(tmp_path) == []


async def test_scratch_base_that_is_not_ours_fails_the_task(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "scratch").symlink_to(tmp_path / "elsewhere")
    outcome = await command(make(tmp_path), ["true"])
    assert outcome.status == "failed"
    assert "scratch directory" in (outcome.error or "")


async def test_command_does_not_see_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETIRE_CLUSTER_TOKEN", "s3cret-token")
    monkeypatch.setenv("SOME_API_KEY", "also-secret")
    outcome = await command(make(tmp_path), ["env"])
    assert outcome.status == "completed"
    assert "s3cret-token" not in (outcome.output or "")
    assert "RETIRE_CLUSTER_TOKEN" not in (outcome.output or "")
    assert "SOME_API_KEY" not in (outcome.output or "")
    env: Dict[str, str] = dict(line.split("=", 1) for line in (outcome.output or "").splitlines() if "=" in line)
    assert Path(env["HOME"]).parent == tmp_path / "scratch"


def test_child_env_is_minimal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETIRE_CLUSTER_TOKEN", "s3cret")
    env = child_env(tmp_path)
    assert "RETIRE_CLUSTER_TOKEN" not in env
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path)
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERMUX_VERSION", "PREFIX", "ANDROID_ROOT",
                        "ANDROID_DATA", "SYSTEMROOT", "PATHEXT", "LD_PRELOAD", "PYTHONIOENCODING",
                        "HOME", "TMPDIR", "TMP", "TEMP"}


# -- sleep -----------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf])
async def test_sleep_rejects_non_finite_seconds(tmp_path: Path, seconds: float) -> None:
    outcome = await make(tmp_path).run({"task_type": "sleep", "payload": {"seconds": seconds}}, lambda p, m: None)
    assert outcome.status == "failed"
    assert "finite" in (outcome.error or "")


# -- under uvloop, as the real worker runs ---------------------------------------------------


def test_the_sandbox_works_under_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> "list[Any]":
        executor = make(tmp_path)
        hi = await command(executor, ["echo", "hi"])
        fed = await command(executor, ["cat"], stdin="fed")
        junk = await evaluate(executor, "__import__('os').write(1, b'junk') and 5")
        late = await command(executor, ["sleep", "60"], timeout=1)
        return [hi.output, fed.output, junk.output, junk.stdout, late.status]

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == ["hi\n", "fed", "5", "junk", "timeout"]
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    assert scratch_left(tmp_path) == []


def test_scratch_dirs_of_workers_that_are_gone_are_swept(tmp_path: Path) -> None:
    """A worker killed with -9 cannot remove its task's scratch directory; the next one does."""
    import os
    import subprocess
    import sys

    from retire_cluster.worker.sandbox import make_scratch_dir, sweep_scratch_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)
    left = tmp_path / f"task-{dead_pid}-abc123"
    (left / "work").mkdir(parents=True)
    (left / "work" / "file").write_text("x")
    mine = make_scratch_dir(tmp_path)
    assert mine.name.startswith(f"task-{os.getpid()}-")
    old_style = tmp_path / "task-qwerty"  # no pid in the name: not ours to judge
    old_style.mkdir()
    assert sweep_scratch_dirs(tmp_path) == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "task-qwerty"])
    assert sweep_scratch_dirs(tmp_path / "missing") == (0, 0)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for an init that does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds processes through /proc (Linux)")
def test_processes_a_killed_workers_task_left_running_are_killed_by_the_sweep(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG kills the task's own process with the worker, not what it started in the background.

    Before, `sh -c 'sleep 100 & sleep 101'` left both sleeps running for good after a kill -9 of the worker.
    """
    import subprocess
    import sys
    import time

    from retire_cluster.worker.sandbox import child_env, sweep_scratch_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    left = tmp_path / f"task-{int(gone.stdout)}-abc123"
    left.mkdir()
    task = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; cd /; sleep 301 & echo $!; wait"], cwd=left,
                            env=child_env(left), stdout=subprocess.PIPE, text=True, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "302"], cwd=tmp_path)  # not in the scratch dir: not the task's
    try:
        pids = [int(task.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
        deadline = time.monotonic() + 30  # each sleep forked; wait until it is sleep (exec done) too
        while not all(_exec_done(pid, b"sleep") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(_running(pid) and _exec_done(pid, b"sleep") for pid in pids)
        removed, killed = sweep_scratch_dirs(tmp_path)
        assert (removed, killed) == (1, 3)  # sh, the sleep in the dir, the one that left it (HOME says whose)
        assert task.wait(timeout=30) == -9
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in pids)
        assert bystander.poll() is None and not left.exists()
    finally:
        for proc in (task, bystander):
            proc.kill()
            proc.wait()
        task.stdout.close()  # type: ignore[union-attr]


def _exec_done(pid: int, program: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return os.path.basename(fh.read().split(b"\0", 1)[0]) == program
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds processes through /proc (Linux)")
def test_a_leftover_missed_by_one_scan_of_proc_is_killed_by_the_next(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A process caught mid-``exec`` shows an empty environment for that moment; the sweep scans again.

    Before, one scan: CI once saw (1, 2) for three leftovers, the one known only by its HOME missed.
    """
    import subprocess

    from retire_cluster.worker import sandbox

    left = tmp_path / "task-1-abc123"
    left.mkdir()
    in_dir = subprocess.Popen(["sleep", "303"], cwd=left, start_new_session=True)
    by_home = subprocess.Popen(["sleep", "304"], cwd="/", env=sandbox.child_env(left), start_new_session=True)
    real = sandbox._works_in
    seen: list = []

    def first_scan_misses_it(proc_dir: str, target: str, marks: tuple) -> bool:
        if proc_dir == f"/proc/{by_home.pid}" and proc_dir not in seen:
            seen.append(proc_dir)
            return False  # as a process in the middle of its exec reads
        return real(proc_dir, target, marks)

    monkeypatch.setattr(sandbox, "_works_in", first_scan_misses_it)
    try:
        assert sandbox.kill_leftovers(left) == 2  # each counted once
        assert in_dir.wait(timeout=30) == -9 and by_home.wait(timeout=30) == -9
        assert seen == [f"/proc/{by_home.pid}"]
    finally:
        for proc in (in_dir, by_home):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states in /proc (Linux)")
def test_a_killed_worker_not_yet_reaped_counts_as_gone(tmp_path: Path) -> None:
    """A worker killed with -9 stays a zombie until its parent (often init) reaps it; its leftovers are swept.

    Before, the next worker took the zombie for a live worker and left its scratch directory, and the
    processes working in it, alone.
    """
    import subprocess
    import time

    from retire_cluster.worker.sandbox import sweep_scratch_dirs

    dead = subprocess.Popen(["true"])  # not waited for: a zombie until the end of the test
    deadline = time.monotonic() + 30
    while _running(dead.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert Path(f"/proc/{dead.pid}").exists() and not _running(dead.pid)  # a zombie, not gone
        (tmp_path / f"task-{dead.pid}-abc123").mkdir()
        assert sweep_scratch_dirs(tmp_path) == (1, 0)
        assert list(tmp_path.iterdir()) == []
    finally:
        dead.wait()
