"""Plug-in task types through the ``retire_cluster.task_types`` entry point group.

Each test builds a tiny "installed distribution" in tmp_path (a module plus a
``*.dist-info`` with METADATA and entry_points.txt) and puts it on sys.path,
which is all importlib.metadata looks at; the example plug-in in
examples/plugin_wordcount/ is installed that way, from its own files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from retire_cluster.worker.executor import Executor, Outcome
from retire_cluster.worker.plugins import (
    ENTRY_POINT_GROUP,
    TaskContext,
    entry_points,
    load_plugins,
    plugin_result,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "plugin_wordcount"
ProgressCalls = List[Tuple[float, str]]


def install(site: Path, dist: str, entry_points_txt: str, modules: Dict[str, str]) -> None:
    """Write modules and a dist-info for ``dist`` into ``site`` (a directory on sys.path)."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points_txt), encoding="utf-8")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh directory on sys.path; the modules imported from it are forgotten afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(path) in str(sys.modules[name].__file__):
            del sys.modules[name]


@pytest.fixture
def wordcount_installed(site: Path) -> Path:
    """The example plug-in, installed from its own module and the entry point its pyproject declares."""
    shutil.copy(EXAMPLE / "retire_cluster_wordcount.py", site)
    install(site, "retire_cluster_wordcount", f"""\
        [{ENTRY_POINT_GROUP}]
        wordcount = retire_cluster_wordcount:WordCount
        """, {})
    return site


def make(tmp_path: Path, **kwargs: Any) -> Executor:
    return Executor(frozenset({"echo", "sleep"}), scratch_base=tmp_path / "scratch", **kwargs)


async def run(executor: Executor, task_type: str, payload: Dict[str, Any],
              calls: "ProgressCalls | None" = None, timeout: float = 30) -> Outcome:
    def progress(percent: float, message: str) -> None:
        if calls is not None:
            calls.append((percent, message))

    return await executor.run({"task_type": task_type, "payload": payload, "timeout": timeout}, progress)


# -- the example plug-in ----------------------------------------------------------------


def test_example_pyproject_declares_the_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == {"wordcount": "retire_cluster_wordcount:WordCount"}
    assert (EXAMPLE / "README.md").is_file()


async def test_wordcount_run_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from retire_cluster_wordcount import WordCount

    calls: ProgressCalls = []
    context = TaskContext(lambda p, m: calls.append((p, m)), 30.0, tmp_path)
    result = await WordCount().run({"text": "the cat and the hat", "top": 2}, context)
    assert json.loads(result["output"]) == {
        "words": 5, "unique_words": 4, "lines": 1, "characters": 19, "top": [["the", 2], ["cat", 1]],
    }
    assert result["metrics"] == {"words": 5, "characters": 19}
    assert calls == []  # short text: one chunk, no progress
    with pytest.raises(ValueError, match="payload.text"):
        await WordCount().run({}, context)
    with pytest.raises(ValueError, match="payload.top"):
        await WordCount().run({"text": "x", "top": -1}, context)


async def test_wordcount_long_text_reports_progress_and_never_splits_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import retire_cluster_wordcount

    monkeypatch.setattr(retire_cluster_wordcount, "CHUNK_CHARS", 7)
    calls: ProgressCalls = []
    context = TaskContext(lambda p, m: calls.append((p, m)), 30.0, tmp_path)
    result = await retire_cluster_wordcount.WordCount().run({"text": "alpha beta gamma\ndelta alpha\n"}, context)
    summary = json.loads(result["output"])
    assert (summary["words"], summary["lines"]) == (5, 2)
    assert summary["top"][0] == ["alpha", 2]
    assert calls and all(0 < p < 100 for p, _ in calls)


async def test_wordcount_is_discovered_and_runs(wordcount_installed: Path, tmp_path: Path) -> None:
    executor = make(tmp_path)
    assert "wordcount" in executor.task_types
    assert executor.can_run("wordcount")
    assert executor.task_types == ["echo", "sleep", "wordcount"]
    outcome = await run(executor, "wordcount", {"text": "a b a"})
    assert outcome.status == "completed"
    assert json.loads(outcome.output or "")["top"] == [["a", 2], ["b", 1]]
    assert outcome.metrics == {"words": 3, "characters": 5}
    assert outcome.exit_code == 0
    failed = await run(executor, "wordcount", {"text": 42})
    assert (failed.status, failed.error) == ("failed", "wordcount needs payload.text, a string")
    assert not (tmp_path / "scratch").exists() or not list((tmp_path / "scratch").iterdir())


def test_entry_points_of_the_group(wordcount_installed: Path) -> None:
    assert [(ep.name, ep.value) for ep in entry_points()] == [("wordcount", "retire_cluster_wordcount:WordCount")]
    assert entry_points("retire_cluster.no_such_group") == []


# -- refused and broken plug-ins ------------------------------------------------------------


async def test_broken_plugin_is_skipped_and_the_others_load(site: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    install(site, "rc_plugins_test", f"""\
        [{ENTRY_POINT_GROUP}]
        broken = rc_broken_plugin:Broken
        missing = rc_no_such_module:Thing
        good = rc_good_plugin:Good
        """, {
        "rc_broken_plugin": "import rc_this_does_not_exist\n",
        "rc_good_plugin": """\
            class Good:
                name = "good"

                async def run(self, payload, context):
                    context.progress(50.0, "half")
                    (context.scratch_dir / "f").write_text("scratch works")
                    return (context.scratch_dir / "f").read_text() + " in %g s" % context.timeout_s
            """,
    })
    with caplog.at_level(logging.ERROR, logger="retire_cluster.worker"):
        executor = make(tmp_path)
    assert executor.task_types == ["echo", "good", "sleep"]
    assert "broken" in caplog.text and "could not be loaded" in caplog.text
    assert "missing" in caplog.text
    # One sentence each that says what to do; no traceback buries the worker's start-up lines.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    for record in errors:
        assert record.exc_info is None and "\n" not in record.getMessage()
        assert "skipped (the other task types still run)" in record.getMessage()
        if sys.version_info >= (3, 10):  # EntryPoint.dist
            assert record.getMessage().endswith("fix it or run `pip uninstall rc_plugins_test`.")
    assert "ModuleNotFoundError: No module named 'rc_this_does_not_exist'" in errors[0].getMessage()
    calls: ProgressCalls = []
    outcome = await run(executor, "good", {}, calls, timeout=12)
    assert (outcome.status, outcome.output) == ("completed", "scratch works in 12 s")
    assert calls == [(50.0, "half")]


async def test_plugin_named_like_a_builtin_is_refused(site: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    install(site, "rc_shadow_test", f"""\
        [{ENTRY_POINT_GROUP}]
        echo = rc_shadow_plugin:FakeEcho
        shell = rc_shadow_plugin:FakeCommand
        """, {"rc_shadow_plugin": """\
            class FakeEcho:
                name = "echo"

                async def run(self, payload, context):
                    return "hijacked"


            class FakeCommand:
                name = "command"

                async def run(self, payload, context):
                    return "hijacked"
            """})
    with caplog.at_level(logging.ERROR, logger="retire_cluster.worker"):
        executor = make(tmp_path)
    assert "refused" in caplog.text and "'echo'" in caplog.text and "'command'" in caplog.text
    assert executor.plugins == {}
    assert executor.task_types == ["echo", "sleep"]
    assert not executor.can_run("command")  # still opt-in, not enabled by a plug-in
    outcome = await run(executor, "echo", {"message": "real"})
    assert outcome.output == "real"


def test_plugin_without_name_or_run_or_with_a_taken_name_is_skipped(site: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    install(site, "rc_odd_test", f"""\
        [{ENTRY_POINT_GROUP}]
        noname = rc_odd_plugin:NoName
        norun = rc_odd_plugin:NoRun
        first = rc_odd_plugin:First
        second = rc_odd_plugin:Second
        crashes = rc_odd_plugin:Crashes
        """, {"rc_odd_plugin": """\
            class NoName:
                async def run(self, payload, context):
                    return ""


            class NoRun:
                name = "norun"


            class First:
                name = "twin"

                async def run(self, payload, context):
                    return "first"


            class Second(First):
                pass


            class Crashes:
                name = "crashes"

                def __init__(self):
                    raise SystemExit("no")
            """})
    with caplog.at_level(logging.ERROR, logger="retire_cluster.worker"):
        plugins = load_plugins({"echo"})
    assert list(plugins) == ["twin"]
    assert type(plugins["twin"]).__name__ == "First"
    assert "taken by another plug-in" in caplog.text


# -- what run() may return ----------------------------------------------------------------


class Scripted:
    """A plug-in object (not a class) whose run returns or raises what the test says."""

    name = "scripted"

    def __init__(self, value: Any = None, error: "BaseException | None" = None, delay_s: float = 0) -> None:
        self.value, self.error, self.delay_s = value, error, delay_s

    async def run(self, payload: Dict[str, Any], context: TaskContext) -> Any:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.value


async def scripted(tmp_path: Path, timeout: float = 30, **kwargs: Any) -> Outcome:
    executor = make(tmp_path, plugins={"scripted": Scripted(**kwargs)})
    return await run(executor, "scripted", {}, timeout=timeout)


async def test_plugin_results(tmp_path: Path) -> None:
    outcome = await scripted(tmp_path, value="plain text")
    assert (outcome.status, outcome.output, outcome.exit_code) == ("completed", "plain text", 0)
    outcome = await scripted(tmp_path, value={"output": "o", "stderr": "e", "metrics": {"n": 1}})
    assert (outcome.status, outcome.output, outcome.stderr, outcome.metrics) == ("completed", "o", "e", {"n": 1})
    outcome = await scripted(tmp_path, value={"output": "o", "exit_code": 2})
    assert (outcome.status, outcome.exit_code, outcome.error, outcome.output) == ("failed", 2, "exit code 2", "o")
    outcome = await scripted(tmp_path, value={"output": {"k": [1]}})
    assert outcome.output == '{"k":[1]}'


@pytest.mark.parametrize("value, words", [
    (42, "returned int"),
    ({"exit_code": "0"}, "exit_code"),
    ({"metrics": [1]}, "metrics"),
    ({"metrics": {"f": object()}}, "metrics"),
    ({"stderr": 5}, "stderr"),
    ({"output": object()}, "output"),
])
async def test_plugin_bad_results_fail_the_task(tmp_path: Path, value: Any, words: str) -> None:
    outcome = await scripted(tmp_path, value=value)
    assert outcome.status == "failed"
    assert words in (outcome.error or "")
    with pytest.raises(ValueError):
        plugin_result(value, "scripted")


async def test_plugin_exception_fails_with_its_message_capped(tmp_path: Path) -> None:
    outcome = await scripted(tmp_path, error=RuntimeError("disk on fire"))
    assert (outcome.status, outcome.error) == ("failed", "disk on fire")
    outcome = await scripted(tmp_path, error=KeyError())
    assert (outcome.status, outcome.error) == ("failed", "KeyError")
    outcome = await scripted(tmp_path, error=ValueError("é" * 1_000_000))
    assert outcome.status == "failed"
    assert len((outcome.error or "").encode("utf-8")) <= 4096
    assert (outcome.error or "").endswith("[truncated]")


async def test_plugin_timeout_cancels_run(tmp_path: Path) -> None:
    outcome = await scripted(tmp_path, value="never", delay_s=60, timeout=1)
    assert outcome.status == "timeout"
    assert not list((tmp_path / "scratch").iterdir())


@pytest.mark.parametrize("error, words", [
    (SystemExit(3), "plug-in 'scripted' raised SystemExit: 3"),
    (KeyboardInterrupt(), "plug-in 'scripted' raised KeyboardInterrupt"),
    (asyncio.CancelledError(), "plug-in 'scripted' raised CancelledError while the task was not cancelled"),
])
async def test_plugin_raising_a_base_exception_fails_its_task_only(tmp_path: Path, error: BaseException,
                                                                   words: str) -> None:
    """Found by hand: a plug-in's sys.exit() stopped the whole worker (a Task re-raises SystemExit
    out of the event loop), and a CancelledError of its own ended the task "cancelled", which the
    main node takes for a hand-back and assigned again at once, thousands of times a minute."""
    outcome = await scripted(tmp_path, error=error)
    assert (outcome.status, outcome.error) == ("failed", words)
    assert not list((tmp_path / "scratch").iterdir())


class SyncRaises:
    name = "sync_raises"

    def run(self, payload: Dict[str, Any], context: TaskContext) -> Any:
        raise SystemExit("bye")


async def test_sync_plugin_raising_system_exit_fails_its_task_only(tmp_path: Path) -> None:
    executor = make(tmp_path, plugins={"sync_raises": SyncRaises()})
    outcome = await run(executor, "sync_raises", {})
    assert (outcome.status, outcome.error) == ("failed", "plug-in 'sync_raises' raised SystemExit: bye")


async def test_cancelling_a_plugin_task_cancels_run_and_waits_for_its_cleanup(tmp_path: Path) -> None:
    events: List[str] = []
    started = asyncio.Event()

    class Slow:
        name = "slow"

        async def run(self, payload: Dict[str, Any], context: TaskContext) -> str:
            try:
                events.append("started")
                started.set()
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(0)
                events.append("cleaned up")
                raise
            return "never"

    executor = make(tmp_path, plugins={"slow": Slow()})
    job = asyncio.ensure_future(run(executor, "slow", {}))
    await started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert events == ["started", "cleaned up"]
    assert not list((tmp_path / "scratch").iterdir())


async def test_a_plugin_task_does_not_scan_processes_for_leftovers(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Only tasks run in child processes look for what they left running (a /proc scan, ~1 ms per 64
    processes); a plug-in runs in the worker, and a busy plug-in type would pay it at every task."""
    from retire_cluster.worker import sandbox

    scans: list = []
    monkeypatch.setattr(sandbox, "kill_leftovers", lambda path: scans.append(path) or 0)
    outcome = await scripted(tmp_path, value="ok")
    assert outcome.status == "completed" and scans == []
    executor = Executor(frozenset({"command"}), scratch_base=tmp_path / "scratch")
    assert (await run(executor, "command", {"argv": ["true"]})).status == "completed"
    assert len(scans) == 1


# -- a plain (synchronous) run: in a thread of its own -------------------------------------


class Blocking:
    """A plain ``def run`` that blocks on ``gate`` (a threading.Event the test opens), as CPU work would."""

    name = "blocking"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.threads: List[str] = []
        self.returned = threading.Event()

    def run(self, payload: Dict[str, Any], context: TaskContext) -> str:
        self.threads.append(threading.current_thread().name)
        context.progress(50, "half way")  # from the plug-in's thread
        self.started.set()
        self.gate.wait(5)  # bounded: without a thread of its own this blocked the loop, and the test fails
        context.progress(100, "finished")  # after its task ended, when the test cancelled it: dropped
        self.returned.set()
        return "done" if self.gate.is_set() else "gate never opened"


async def wait_for(event: threading.Event) -> None:
    """Wait for a threading.Event without blocking the loop."""
    await asyncio.get_running_loop().run_in_executor(None, event.wait, 10)
    assert event.is_set()


async def test_a_plain_run_goes_to_a_thread_and_the_loop_goes_on(tmp_path: Path) -> None:
    """A synchronous plug-in used to run on the worker's event loop: while it worked, the worker sent no
    heartbeat, ran no other task and could not time it out or cancel it."""
    plugin = Blocking()
    executor = make(tmp_path, plugins={"blocking": plugin})
    calls: ProgressCalls = []
    job = asyncio.ensure_future(run(executor, "blocking", {}, calls))
    await wait_for(plugin.started)
    # The loop is free while the plug-in blocks: another task runs to its end meanwhile.
    other = await run(executor, "sleep", {"seconds": 0})
    assert other.status == "completed" and not plugin.returned.is_set()
    plugin.gate.set()
    outcome = await job
    assert (outcome.status, outcome.output) == ("completed", "done")
    assert plugin.threads and plugin.threads[0] != threading.main_thread().name
    assert calls == [(50.0, "half way"), (100.0, "finished")]  # reported on the loop, from the plug-in's thread
    assert executor.lingering == 0 and not list((tmp_path / "scratch").iterdir())


async def test_a_plain_run_that_raises_fails_its_task(tmp_path: Path) -> None:
    executor = make(tmp_path, plugins={"sync_raises": SyncRaises()})
    outcome = await run(executor, "sync_raises", {})
    assert (outcome.status, outcome.error) == ("failed", "plug-in 'sync_raises' raised SystemExit: bye")
    assert executor.lingering == 0


async def test_a_plain_run_outliving_its_task_keeps_a_slot_until_it_returns(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Python cannot stop a thread: its task ends at the cancel (or timeout), the slot is freed at its return."""
    plugin = Blocking()
    executor = make(tmp_path, plugins={"blocking": plugin})
    calls: ProgressCalls = []
    job = asyncio.ensure_future(run(executor, "blocking", {}, calls))
    await wait_for(plugin.started)
    with caplog.at_level(logging.WARNING, logger="retire_cluster.worker"):
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    assert executor.lingering == 1
    assert "plug-in 'blocking' is still running after its task ended" in caplog.text
    plugin.gate.set()
    await wait_for(plugin.returned)
    for _ in range(500):  # its return is passed to the loop: a few passes
        if executor.lingering == 0:
            break
        await asyncio.sleep(0.01)
    assert executor.lingering == 0
    assert calls == [(50.0, "half way")]  # its report after the task's end was dropped


def test_the_agent_counts_a_lingering_plugin_thread_as_a_busy_slot(tmp_path: Path) -> None:
    from retire_cluster.worker.agent import Agent
    from retire_cluster.worker.config import WorkerConfig

    executor = make(tmp_path, plugins={})
    agent = Agent(WorkerConfig(main_host="127.0.0.1", main_port=1, token="t" * 20, data_dir=tmp_path / "w"),
                  executor=executor)
    assert agent.busy_slots() == 0
    executor._lingering.add(threading.current_thread())
    assert agent.busy_slots() == 1
