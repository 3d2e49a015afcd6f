"""The worker path stays runnable on old devices: Python 3.9, standard library and click.

DESIGN.md "Worker on old devices": Python 3.9 syntax at most, and uvloop,
orjson, psutil and jsonschema used only when importable. Checked four ways:

- vermin finds no 3.10+ syntax or API (match, zip(strict=), new modules and
  members) in the files a worker imports. Annotations are not evaluated:
  every such file has ``from __future__ import annotations`` (checked here),
  so ``X | None`` and ``list[int]`` in annotations are fine on 3.9.
- an AST check finds ``X | Y`` type unions outside annotations, which vermin
  only reports with a heuristic that also flags annotations.
- a real Python 3.9 compiles every file and runs the worker's parts, when
  pyenv has one on this machine.
- with the optional packages made unimportable, the worker, CLI and client
  still import and work.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "retire_cluster"
PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python")
OPTIONAL = ("uvloop", "orjson", "psutil", "jsonschema", "aiosqlite")

needs_python39 = pytest.mark.skipif(not PYTHON39.exists(), reason=f"no Python 3.9 at {PYTHON39}")


def worker_path_files() -> List[Path]:
    """Every module a worker (or a client on the same device) imports."""
    files = sorted(PACKAGE.glob("worker/*.py"))
    files += sorted(p for p in PACKAGE.glob("protocol/*.py") if p.name != "validation.py")  # needs jsonschema
    files += sorted(PACKAGE.glob("client/*.py"))
    files += [
        PACKAGE / "cli.py",
        PACKAGE / "cli_client.py",
        PACKAGE / "tables.py",
        PACKAGE / "runtime.py",
        PACKAGE / "tls.py",
        PACKAGE / "address.py",
        PACKAGE / "link.py",
        PACKAGE / "__init__.py",
        PACKAGE / "__main__.py",
    ]
    return files


FILES = worker_path_files()
IDS = [str(p.relative_to(REPO)) for p in FILES]


def subprocess_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no cpython-39 .pyc files in the tree
    env.update(extra)
    return env


def test_the_file_list_is_complete() -> None:
    for name in (
        "worker/agent.py",
        "worker/config.py",
        "worker/executor.py",
        "worker/profiler.py",
        "protocol/codec.py",
        "protocol/messages.py",
        "client/sync.py",
        "client/aio.py",
        "client/executor.py",
        "client/common.py",
        "client/batch.py",
        "client/watch.py",
        "cli.py",
        "cli_client.py",
    ):
        assert PACKAGE / name in FILES, name
    assert all(p.is_file() for p in FILES)
    assert PACKAGE / "protocol" / "validation.py" not in FILES


# -- vermin -----------------------------------------------------------------------

# runtime.run uses asyncio.Runner only under `if sys.version_info >= (3, 11)`, which vermin cannot see.
VERMIN_ARGS = [
    "-t=3.9-",
    "--no-tips",
    "--violations",
    "--no-config-file",
    "--no-eval-annotations",
    "--exclude",
    "asyncio.Runner",
]


def vermin(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("vermin")
    code = "import sys; from vermin import main; sys.argv[0] = 'vermin'; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *VERMIN_ARGS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_vermin_finds_nothing_newer_than_python39() -> None:
    result = vermin(*map(str, FILES))
    assert result.returncode == 0, f"needs Python > 3.9:\n{result.stdout}{result.stderr}"


def test_the_vermin_flags_do_catch_310_features(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent("""\
        from __future__ import annotations

        def f(pairs: list[tuple[int, int]] | None) -> int | None:
            match pairs:
                case None:
                    return None
            return len(list(zip([1], [2], strict=True)))
        """),
        encoding="utf-8",
    )
    result = vermin(str(bad))
    assert result.returncode != 0
    assert "pattern matching" in result.stdout
    assert "zip(strict)" in result.stdout
    assert "union types" not in result.stdout  # annotations are not evaluated


def test_the_vermin_flags_accept_postponed_annotations(tmp_path: Path) -> None:
    ok = tmp_path / "ok.py"
    ok.write_text(
        textwrap.dedent("""\
        from __future__ import annotations

        def f(pairs: list[tuple[int, int]] | None, *, n: dict[str, int | None]) -> int | None:
            total: int | None = None
            return total
        """),
        encoding="utf-8",
    )
    result = vermin(str(ok))
    assert result.returncode == 0, result.stdout


# -- annotations and runtime unions ---------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_annotations_are_postponed(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    has_annotations = any(
        (isinstance(node, ast.arg) and node.annotation is not None)
        or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None)
        or isinstance(node, ast.AnnAssign)
        for node in ast.walk(tree)
    )
    if has_annotations:
        future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
        assert any(a.name == "annotations" for n in future for a in n.names), (
            f"{path.name} has annotations but no `from __future__ import annotations`"
        )


TYPE_NAMES = {
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "list",
    "dict",
    "tuple",
    "set",
    "frozenset",
    "type",
    "object",
    "Any",
    "Optional",
    "Union",
    "List",
    "Dict",
    "Tuple",
    "Set",
    "FrozenSet",
    "Callable",
    "Sequence",
    "Mapping",
    "Iterable",
    "Iterator",
    "Awaitable",
    "Coroutine",
}


def _looks_like_a_type(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Name):
        return node.id in TYPE_NAMES
    if isinstance(node, ast.Subscript):
        return _looks_like_a_type(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_a_type(node.left) or _looks_like_a_type(node.right)
    return False


def runtime_type_unions(source: str) -> List[int]:
    """Lines with ``X | Y`` between types that Python evaluates (not in an annotation)."""
    tree = ast.parse(source)
    in_annotations = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is not None:
                in_annotations.update(id(sub) for sub in ast.walk(annotation))
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitOr)
        and id(node) not in in_annotations
        and _looks_like_a_type(node)
    )


def test_runtime_union_check_catches_what_it_should() -> None:
    source = textwrap.dedent("""\
        from __future__ import annotations
        Alias = int | None
        def f(x: int | None, y: dict[str, int | None]) -> str | None:
            flags = 1 | 2
            held = set() | {1}
            z: list[int] | None = None
            return isinstance(x, (int | str))
        """)
    assert runtime_type_unions(source) == [2, 7]


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_no_runtime_type_unions(path: Path) -> None:
    lines = runtime_type_unions(path.read_text(encoding="utf-8"))
    assert lines == [], f"{path.name}: `X | Y` evaluated at run time (3.10+) on lines {lines}"


# -- a real Python 3.9 ---------------------------------------------------------------------


@needs_python39
def test_python39_compiles_every_file() -> None:
    # compile() rather than `py_compile`, which would write __pycache__/*.cpython-39.pyc into the tree.
    script = textwrap.dedent("""\
        import sys
        bad = []
        for path in sys.argv[1:]:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
            try:
                compile(source, path, "exec", dont_inherit=True)
            except SyntaxError as exc:
                bad.append("%s:%s: %s" % (path, exc.lineno, exc.msg))
        print("\\n".join(bad))
        sys.exit(1 if bad else 0)
        """)
    result = subprocess.run(
        [str(PYTHON39), "-I", "-c", script, *map(str, FILES)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


WORKER_SMOKE = textwrap.dedent("""\
    import asyncio, json, sys, tempfile
    from pathlib import Path

    import retire_cluster.client
    import retire_cluster.client.batch
    import retire_cluster.client.watch
    import retire_cluster.protocol
    import retire_cluster.tables
    import retire_cluster.worker
    import retire_cluster.worker.agent
    from retire_cluster.protocol.codec import dumps, encode, loads
    from retire_cluster.runtime import run
    from retire_cluster.worker import Agent, Executor, Profiler, WorkerConfig

    async def main():
        profiler = Profiler(data_dir=Path(tempfile.gettempdir()))
        metrics = profiler.system_metrics()
        specs = profiler.hardware_specs()
        executor = Executor(frozenset({"echo", "sleep", "python_eval"}))
        echo = await executor.run({"task_type": "echo", "payload": {"message": "hi"}}, lambda p, m: None)
        sleep = await executor.run({"task_type": "sleep", "payload": {"seconds": 0.01}}, lambda p, m: None)
        evaluated = await executor.run(
            {"task_type": "python_eval", "payload": {"expression": "sum(range(100000))"}, "timeout": 60},
            lambda p, m: None)
        config = WorkerConfig(device_id="smoke", data_dir=Path(tempfile.gettempdir()) / "rc-smoke")
        agent = Agent(config, profiler=profiler, executor=executor)
        frame = encode(agent._message("register", agent._register_data()))
        beat = encode(agent._message("heartbeat", agent._heartbeat_data()))
        return {
            "metrics": sorted(metrics), "cores": specs["cpu_cores"],
            "echo": [echo.status, echo.output], "sleep": sleep.status,
            "eval": [evaluated.status, evaluated.output, evaluated.error],
            "register_type": loads(frame)["message_type"], "heartbeat_type": loads(beat)["message_type"],
            "roundtrip": loads(dumps({"a": [1, "é"]})),
        }

    result = run(main())
    result["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
    print(json.dumps(result))
    """)


def check_smoke(result: Dict[str, object]) -> None:
    assert result["echo"] == ["completed", "hi"]
    assert result["sleep"] == "completed"
    assert result["eval"] == ["completed", "4999950000", None]
    assert {"cpu_usage", "memory_usage", "disk_usage", "load_average", "uptime"} <= set(result["metrics"])
    assert result["register_type"] == "register" and result["heartbeat_type"] == "heartbeat"
    assert result["roundtrip"] == {"a": [1, "é"]}


@needs_python39
def test_python39_runs_the_worker_parts() -> None:
    # The 3.9 here has no third-party packages at all; click is only needed by cli.py, not imported.
    script = WORKER_SMOKE.replace("{OPTIONAL!r}", repr(set(OPTIONAL)))
    result = subprocess.run(
        [str(PYTHON39), "-B", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_smoke(json.loads(result.stdout.splitlines()[-1]))


# -- without the optional packages -------------------------------------------------------

BLOCKER = textwrap.dedent("""\
    import sys

    BLOCKED = {OPTIONAL!r}
    already = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not already, "imported before the blocker: %s" % already

    class Blocker:
        attempts = []

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                cls.attempts.append(name)
                raise ImportError("blocked for the test: " + name)
            return None

    sys.meta_path.insert(0, Blocker)

    import retire_cluster.cli
    import retire_cluster.worker.profiler
    import retire_cluster.protocol.codec
    assert retire_cluster.worker.profiler._psutil is None
    assert retire_cluster.protocol.codec._orjson is None
    from click.testing import CliRunner
    help_text = CliRunner().invoke(retire_cluster.cli.cli, ["worker", "--help"])
    assert help_text.exit_code == 0, help_text.output
    assert "--allow" in help_text.output
    """)


def test_worker_cli_and_client_work_without_optional_packages() -> None:
    pytest.importorskip("click")
    script = (BLOCKER + WORKER_SMOKE).replace("{OPTIONAL!r}", repr(set(OPTIONAL)))
    script += "assert not result['loaded'], result['loaded']\n"
    script += (
        "assert {'orjson', 'uvloop'} <= set(Blocker.attempts), Blocker.attempts  # the blocker did work\n"
        # psutil is tried only where /proc does not answer (worker/profiler.py)
        "assert retire_cluster.worker.profiler.PROC_ANSWERS or 'psutil' in Blocker.attempts\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    check_smoke(outcome)
    assert outcome["loaded"] == []
