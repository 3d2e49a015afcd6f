"""The client commands of ``retire-cluster``: submit, status, devices, tasks, task,
cancel, submit-batch and watch (registered on the group in :mod:`retire_cluster.cli`).

They read ``--main`` / ``--token`` from ``RETIRE_CLUSTER_MAIN`` /
``RETIRE_CLUSTER_TOKEN`` too, print tables for people and JSON with ``--json``,
and exit non-zero with one sentence on any error.

Standard library and click only at import time (the worker imports the
command group): the client modules are imported inside the commands.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import click

from .protocol.errors import ProtocolError
from .protocol.messages import PRIORITY_NAMES, REQUIREMENT_KEYS, TaskStatus
from .tables import (
    DEVICE_HEADERS,
    HELD_STATUSES,
    TASK_HEADERS,
    cut,
    device_row,
    format_table,
    paused_reasons,
    stuck_lines,
    task_detail,
    task_row,
)

EXIT_ERROR = 1
#: --wait-timeout ran out before the task (or every task of a batch) ended; as GNU ``timeout`` exits.
EXIT_WAIT_TIMEOUT = 124
#: Ctrl-C while waiting (what a shell reports for SIGINT).
EXIT_INTERRUPTED = 130
#: `submit --wait` says where the task is when it has not ended after this many seconds.
NOTICE_S = 5.0
TASK_STATES = [s.value for s in TaskStatus]

# -- helpers ------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True))


def _remember_fingerprint(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    ctx.meta["retire_cluster.tls_fingerprint"] = value


def _tls_fingerprint() -> Optional[str]:
    """--tls-fingerprint of the client command being run (kept out of every signature)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get("retire_cluster.tls_fingerprint")


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--tls-fingerprint", envvar="RETIRE_CLUSTER_TLS_FINGERPRINT", expose_value=False,
                      callback=_remember_fingerprint, metavar="SHA256",
                      help="Speak TLS and accept only the main node certificate with this SHA-256 "
                           "fingerprint [env RETIRE_CLUSTER_TLS_FINGERPRINT].")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option("--token", envvar="RETIRE_CLUSTER_TOKEN", default=None,
                      help="Cluster token [env RETIRE_CLUSTER_TOKEN].")(fn)
    fn = click.option("--main", "main_addr", envvar="RETIRE_CLUSTER_MAIN", default="127.0.0.1:8080",
                      show_default=True, help="Main node HOST[:PORT] [env RETIRE_CLUSTER_MAIN].")(fn)
    return fn


def _check_wait_timeout(ctx: click.Context, param: click.Parameter, value: Optional[float]) -> Optional[float]:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise click.BadParameter("must be a number of seconds more than 0.", ctx=ctx, param=param)
    return value


def wait_timeout_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--wait-timeout", type=float, metavar="SECONDS", callback=_check_wait_timeout,
                        help=f"Wait at most this long (implies --wait): {what} goes on, and the command "
                             f"exits {EXIT_WAIT_TIMEOUT}.")


def _client(main_addr: str, token: Optional[str]) -> Any:
    from .client.sync import Client

    try:
        return Client(main_addr, token, tls_fingerprint=_tls_fingerprint())
    except ValueError as exc:
        _fail(str(exc), 2)


def _async_client(main_addr: str, token: Optional[str]) -> Any:
    from .client.aio import AsyncClient

    try:
        return AsyncClient(main_addr, token, tls_fingerprint=_tls_fingerprint())
    except ValueError as exc:
        _fail(str(exc), 2)


def _call(fn: Callable[[], Any]) -> Any:
    """Run a client call, turning every failure into one sentence and exit 1."""
    from .client.sync import ClientError

    try:
        return fn()
    except ProtocolError as exc:
        if exc.code == "unauthorized":  # the main node's words name the wire field auth_token
            ctx = click.get_current_context(silent=True)
            given = ctx is not None and ctx.params.get("token")
            _fail(f"the main node {'refused this token' if given else 'needs the cluster token'}; pass it with "
                  "--token or RETIRE_CLUSTER_TOKEN (`retire-cluster token` on the main node prints it).")
        _fail(exc.message)
    except ClientError as exc:
        _fail(str(exc))
    except TimeoutError as exc:
        _fail(f"{exc}; the main node may be overloaded or the task still running.")


def parse_requirements(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` pairs for --requires into a requirements object."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value, e.g. min_cpu_cores=2.",
                                     param_hint="--requires")
        if key not in REQUIREMENT_KEYS:
            raise click.BadParameter(
                f"unknown requirement {key!r}; use one of {', '.join(sorted(REQUIREMENT_KEYS))}.",
                param_hint="--requires")
        try:
            if key == "min_cpu_cores":
                out[key] = int(value)
            elif key == "min_memory_gb":
                out[key] = float(value)
                if not math.isfinite(out[key]):
                    raise ValueError(value)
            elif key == "capabilities":
                out[key] = [c.strip() for c in value.split(",") if c.strip()]
            else:
                out[key] = value
        except ValueError:
            kind = "a whole number" if key == "min_cpu_cores" else "a number"
            raise click.BadParameter(f"{key} needs {kind}, got {value!r}.", param_hint="--requires") from None
    return out


def _priority(value: Optional[str]) -> Any:
    if value is None:
        return None
    if value.isdigit():
        number = int(value)
        if 0 <= number <= 100:
            return number
    elif value.lower() in PRIORITY_NAMES:
        return value.lower()
    raise click.BadParameter("use low, normal, high, urgent or an integer 0-100.", param_hint="--priority")


# -- client commands -----------------------------------------------------------


@click.command("submit")
@click.argument("task_type")
@click.option("--payload", default="{}", show_default=True, help="Task payload, a JSON object.")
@click.option("--priority", help="low, normal, high, urgent or 0-100.  [default: normal]")
@click.option("--timeout", type=float, help="Seconds before the task ends as timeout.  [default: 3600]")
@click.option("--requires", multiple=True, metavar="KEY=VALUE",
              help=f"Requirement (repeatable): {', '.join(sorted(REQUIREMENT_KEYS))}.")
@click.option("--max-retries", type=click.IntRange(0, 100), help="Retries after a lost device.  [default: 3]")
@click.option("--retry-on-timeout", is_flag=True,
              help="Also retry (up to --max-retries) when an attempt runs past --timeout.")
@click.option("--idempotency-key", help="Submitting twice with the same key returns the first task.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@wait_timeout_option("the task")
@client_options
def submit_cmd(task_type: str, payload: str, priority: Optional[str], timeout: Optional[float],
               requires: Sequence[str], max_retries: Optional[int], retry_on_timeout: bool,
               idempotency_key: Optional[str], wait: bool, wait_timeout: Optional[float], main_addr: str,
               token: Optional[str], as_json: bool) -> None:
    """Submit a task of TASK_TYPE (echo, sleep, python_eval, command, ...)."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); pass an object such as "
                                 "'{\"message\": \"hi\"}'.", param_hint="--payload") from None
    if not isinstance(body, dict):
        raise click.BadParameter("must be a JSON object such as '{\"message\": \"hi\"}'.", param_hint="--payload")
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise click.BadParameter("must be a number of seconds more than 0.", param_hint="--timeout")
    from .client.common import fresh_key

    options = {
        "priority": _priority(priority), "timeout": timeout, "requirements": parse_requirements(requires),
        "max_retries": max_retries, "retry_on_timeout": retry_on_timeout or None,
        # A key of its own: a connection lost before the answer (a main node restart, a Wi-Fi drop) is
        # then sent again on a new one and finds the same task, instead of failing with "check whether
        # it took effect".
        "idempotency_key": idempotency_key or fresh_key("cli"),
    }  # fmt: skip
    if not options["requirements"]:
        options["requirements"] = None
    with _client(main_addr, token) as client:
        if not wait and wait_timeout is None:
            task_id = _call(lambda: client.submit(task_type, body, **options))
            if as_json:
                _emit({"task_id": task_id})
            else:
                click.echo(task_id)
            return
        from .client.common import TERMINAL

        # One request: the reply is the end, unless the task is still going after NOTICE_S
        # (or --wait-timeout, if sooner).
        started = time.monotonic()
        first_s = NOTICE_S if wait_timeout is None else min(NOTICE_S, wait_timeout)
        task_id = None
        try:
            record = _call(lambda: client.run(task_type, body, wait_s=first_s, **options))
            if record.get("status") not in TERMINAL:
                task_id = str(record["task_id"])
                record = _wait_on(client, task_id, wait_timeout, started, said=first_s < NOTICE_S)
        except KeyboardInterrupt:
            _stopped_waiting(f"task {task_id} goes on; `retire-cluster task {task_id}` shows it" if task_id else
                             "the task was submitted and goes on; `retire-cluster tasks` lists it")
    _end_with(record, as_json)


def _wait_on(client: Any, task_id: str, wait_timeout: Optional[float], started: float, *,
             said: bool = False) -> Dict[str, Any]:
    """Wait for a task that has not ended yet: its end record, or its record now if --wait-timeout runs out.

    Says where the task is first (unless ``said``: the wait ran out before NOTICE_S).
    """
    from .client.common import TERMINAL

    record: Dict[str, Any] = _call(lambda: client.status(task_id))
    if record.get("status") in TERMINAL:
        return record
    left = None if wait_timeout is None else wait_timeout - (time.monotonic() - started)
    if left is not None and left <= 0:
        return record
    if not said:
        _say_still_waiting(record)
    ended: Optional[Dict[str, Any]] = _call(lambda: _wait_or_none(client, task_id, left))
    return ended if ended is not None else dict(_call(lambda: client.status(task_id)))


def _wait_or_none(client: Any, task_id: str, timeout_s: Optional[float]) -> Optional[Dict[str, Any]]:
    """The task's end record, or None when ``timeout_s`` ran out first (other timeouts are errors)."""
    if timeout_s is None:
        return dict(client.wait(task_id))
    try:
        return dict(client.wait(task_id, timeout_s=timeout_s))
    except TimeoutError:
        return None


def _end_with(record: Dict[str, Any], as_json: bool) -> None:
    """Print how the task ended (or where it is, when --wait-timeout ran out) and exit with the code that says so."""
    from .client.common import TERMINAL

    if as_json:
        _emit(record)
    if record.get("status") not in TERMINAL:
        task_id = record.get("task_id")
        where = ("waiting for a device" if record.get("status") == "pending" else
                 f"{record.get('status')} on {record.get('assigned_device') or 'a device'}")
        click.echo(f"task {task_id} did not end within --wait-timeout; it is {where} and goes on "
                   f"(`retire-cluster task {task_id} --wait` waits again, `retire-cluster cancel {task_id}` "
                   "drops it).", err=True)
        sys.exit(EXIT_WAIT_TIMEOUT)
    if not as_json:
        _print_outcome(record)
    if record.get("status") != "completed":
        sys.exit(EXIT_ERROR)


def _stopped_waiting(what_goes_on: str) -> None:
    """Ctrl-C while waiting: say that only the waiting stopped, and exit 130 (as a shell does)."""
    click.echo(f"\nstopped waiting; {what_goes_on}.", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _tasks(n: int) -> str:
    return f"{n} task" if n == 1 else f"{n} tasks"


def _say_still_waiting(record: Dict[str, Any]) -> None:
    """`submit --wait`: a task that has not ended after NOTICE_S gets one line on stderr saying where it is."""
    task_id, status = record.get("task_id"), record.get("status")
    if status == "pending":
        where = f"task {task_id} is waiting for a device: {record.get('waiting') or 'none has taken it yet.'}"
        after = f"the task stays queued; `retire-cluster cancel {task_id}` drops it"
    else:
        where = f"task {task_id} is {status} on {record.get('assigned_device') or 'a device'}."
        after = "the task goes on"
    click.echo(f"{where}\nStill waiting; Ctrl-C stops waiting ({after}).", err=True)


async def _notice_stuck(client: Any) -> None:
    """`submit-batch --wait`: after NOTICE_S, say once which kinds of task no device can run."""
    await asyncio.sleep(NOTICE_S)
    _say_stuck(stuck_lines(await client.cluster_status()))


def _say_stuck(lines: List[str]) -> None:
    if lines:
        click.echo("\n" + "\n".join(lines) + "\nStill waiting; Ctrl-C stops waiting (the tasks stay queued).",
                   err=True)


def _print_outcome(record: Dict[str, Any]) -> None:
    result = record.get("result") or {}
    printed = result.get("stdout")  # what a python_eval printed; its value is the output
    if record.get("status") == "completed":
        if printed:
            click.echo(printed, nl=False)
        output = "" if result.get("output") is None else str(result["output"])
        click.echo(output, nl=not output.endswith("\n"))  # a command's stdout ends its own last line
        if result.get("truncated"):
            click.echo("(output truncated)", err=True)
        return
    reason = record.get("error") or result.get("error") or "no details"
    click.echo(f"task {record.get('task_id')} {record.get('status')}: {reason}", err=True)
    for text in (printed, result.get("output"), result.get("stderr")):  # what it wrote before it ended
        if text:
            click.echo(text.rstrip(), err=True)


@click.command("status")
@client_options
def status_cmd(main_addr: str, token: Optional[str], as_json: bool) -> None:
    """Cluster summary: devices and tasks by state."""
    with _client(main_addr, token) as client:
        status = _call(client.cluster_status)
    if as_json:
        _emit(status)
        return
    devices, tasks, slots = status["devices"], status["tasks"], status.get("slots", {})
    click.echo(f"devices: {devices.get('online', 0)} online, {devices.get('offline', 0)} offline; "
               f"slots: {slots.get('busy', 0)}/{slots.get('total', 0)} busy; "
               f"queue: {status.get('queue_length', 0)}")
    click.echo(format_table(["state", "tasks"], [[k, str(v)] for k, v in tasks.items()]))
    for line in stuck_lines(status):
        click.echo(line)


@click.command("devices")
@click.option("--status", type=click.Choice(["online", "offline"]), help="Only devices in this state.")
@client_options
def devices_cmd(status: Optional[str], main_addr: str, token: Optional[str], as_json: bool) -> None:
    """List devices: status, role, load, battery, active tasks, last seen."""
    with _client(main_addr, token) as client:
        devices = _call(lambda: client.devices(status))
    if as_json:
        _emit(devices)
        return
    if not devices and status:
        click.echo(f"no {status} devices")
        return
    if not devices:
        click.echo("no devices yet; start `retire-cluster worker --main ... --token ...` on one.")
        return
    click.echo("\n".join([format_table(DEVICE_HEADERS, [device_row(d) for d in devices]), *paused_reasons(devices)]))


@click.command("tasks")
@click.option("--status", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@click.option("--device", help="Only tasks assigned to this device.")
@click.option("--type", "task_type", help="Only tasks of this type.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="Most tasks shown.")
@client_options
def tasks_cmd(status: Optional[str], device: Optional[str], task_type: Optional[str], limit: int,
              main_addr: str, token: Optional[str], as_json: bool) -> None:
    """List tasks, newest first."""
    with _client(main_addr, token) as client:
        tasks = _call(lambda: client.tasks(status=status, device_id=device, task_type=task_type, limit=limit))
    if as_json:
        _emit(tasks)
        return
    if not tasks:
        click.echo("no tasks")
        return
    click.echo(format_table(TASK_HEADERS, [task_row(t) for t in tasks]))


@click.command("task")
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait for the task to end and print its result, as submit --wait does.")
@wait_timeout_option("the task")
@client_options
def task_cmd(task_id: str, wait: bool, wait_timeout: Optional[float], main_addr: str, token: Optional[str],
             as_json: bool) -> None:
    """Show one task: every field, its result, and every attempt (device, times, outcome).

    With --wait, wait for its end instead and print its result (exit codes as submit --wait).
    """
    started = time.monotonic()
    device = None
    with _client(main_addr, token) as client:
        if wait or wait_timeout is not None:
            try:
                record = _wait_on(client, task_id, wait_timeout, started)
            except KeyboardInterrupt:
                _stopped_waiting(f"task {task_id} goes on")
            _end_with(record, as_json)
            return
        record = _call(lambda: client.status(task_id))
        held_by = record.get("assigned_device")
        if not as_json and held_by and record.get("status") in HELD_STATUSES:
            # Is the device that holds it still there? A task of a device gone looks stuck otherwise.
            device = next((d for d in _call(client.devices) if d.get("device_id") == held_by), None)
    if as_json:
        _emit(record)
    else:
        click.echo(task_detail(record, device))


@click.command("cancel")
@click.argument("task_id")
@client_options
def cancel_cmd(task_id: str, main_addr: str, token: Optional[str], as_json: bool) -> None:
    """Cancel a pending or running task."""
    with _client(main_addr, token) as client:
        result = _call(lambda: client.cancel(task_id))
    if as_json:
        _emit(result)
    else:
        click.echo(f"task {task_id} cancelled")


# -- submit-batch ------------------------------------------------------------------


@click.command("submit-batch")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--concurrency", type=click.IntRange(1, 10000), default=64, show_default=True,
              help="Tasks sent one at a time in flight at once, when a request of 500 was refused and its lines "
                   "are sent one by one to say which was bad.")
@click.option("--wait", is_flag=True, help="Wait for every task, then print how each ended.")
@wait_timeout_option("every task not ended by then")
@click.option("--on-error", type=click.Choice(["skip", "abort"]), default="skip", show_default=True,
              help="A bad line or a refused task: report it and go on, or stop.")
@client_options
def submit_batch_cmd(file: Any, concurrency: int, wait: bool, wait_timeout: Optional[float], on_error: str,
                     main_addr: str, token: Optional[str], as_json: bool) -> None:
    """Submit one task per line of FILE (JSON Lines; - reads stdin).

    Each line is an object such as {"task_type": "echo", "payload": {"message": "hi"}}, optionally
    with priority, timeout, requirements, max_retries, retry_on_timeout, idempotency_key. Blank lines
    and lines starting with # are skipped. Prints the task ids (with --wait, how each ended) and a
    summary on stderr. Exits 1 if any line was not submitted or any task did not complete; 2 when
    --on-error abort stops at a bad line (then nothing is sent); 124 when --wait-timeout ran out
    before every task ended.
    """
    from .client.batch import read_batch, submit_batch

    started = time.monotonic()
    specs, bad = read_batch(file)
    if bad and on_error == "abort":
        _fail(f"{file.name} line {bad[0][0]}: {bad[0][1]}; nothing was submitted.", 2)
    errors: List[Dict[str, Any]] = [{"line": n, "error": f"{text}; skipped"} for n, text in bad]
    client = _async_client(main_addr, token)

    async def send() -> Dict[int, Any]:
        try:
            await client.connect()
            with click.progressbar(length=len(specs), label="submitting", file=sys.stderr) as bar:
                return await submit_batch(client, specs, concurrency=concurrency,
                                          stop_on_error=on_error == "abort", progress=bar.update)
        finally:
            await client.close()

    outcome = _call(lambda: _run_async(send()))
    submitted = [(line, outcome[line]) for line, _ in specs if isinstance(outcome.get(line), str)]
    errors += [{"line": line, "error": outcome[line]["error"]} for line, _ in specs
               if isinstance(outcome.get(line), dict)]
    errors.sort(key=lambda e: e["line"])
    for error in errors:
        click.echo(f"{file.name} line {error['line']}: {error['error']}", err=True)
    not_sent = len(specs) - len(outcome)
    report: Dict[str, Any] = {"submitted": [{"line": n, "task_id": t} for n, t in submitted],
                              "errors": errors, "not_sent": not_sent}
    problems = f"; {len(errors)} {'line' if len(errors) == 1 else 'lines'} refused or skipped" if errors else ""
    if not_sent:
        problems += f"; {not_sent} not sent after the error (--on-error abort)"
    if wait or wait_timeout is not None:
        done, ended = _wait_and_report(main_addr, token, submitted, report, problems, as_json, wait_timeout,
                                       time.monotonic() - started)
        if ended < len(submitted):
            sys.exit(EXIT_WAIT_TIMEOUT)
        sys.exit(EXIT_ERROR if errors or not_sent or done < len(submitted) else 0)
    if as_json:
        _emit(report)
    else:
        for _, task_id in submitted:
            click.echo(task_id)
    click.echo(f"submitted {_tasks(len(submitted))}{problems}", err=True)
    sys.exit(EXIT_ERROR if errors or not_sent else 0)


def _wait_and_report(main_addr: str, token: Optional[str], submitted: List[Any], report: Dict[str, Any],
                     problems: str, as_json: bool, wait_timeout: Optional[float] = None,
                     spent_s: float = 0.0) -> Tuple[int, int]:
    """`submit-batch --wait`: wait for all, print how each ended; return how many completed, and ended.

    ``wait_timeout`` counts from the command's start (``spent_s`` ago); the
    tasks not ended by then are shown as they are.
    """
    from .client.batch import summarise, wait_batch
    from .client.common import TERMINAL

    left = None if wait_timeout is None else max(wait_timeout - spent_s, 0.001)

    client = _async_client(main_addr, token)

    async def gather() -> Dict[str, Dict[str, Any]]:
        try:
            await client.connect()
            with click.progressbar(length=len(submitted), label="waiting", file=sys.stderr) as bar:
                notice = asyncio.ensure_future(_notice_stuck(client))
                try:
                    return await wait_batch(client, [t for _, t in submitted], progress=bar.update,
                                            timeout_s=left, brief=True)
                finally:
                    notice.cancel()
        finally:
            await client.close()

    try:
        records = _call(lambda: _run_async(gather()))
    except KeyboardInterrupt:
        _stopped_waiting(f"the {_tasks(len(submitted))} submitted go on; `retire-cluster tasks` lists them")
    rows, results, counts = summarise(submitted, records)
    done = int(counts.get("completed", 0))
    ended = sum(n for s, n in counts.items() if s in TERMINAL)
    if as_json:
        report.update(results=results, counts=counts)
        _emit(report)
    elif rows:
        click.echo(format_table(["line", "task", "status", "output / error"], rows))
    others = "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s != "completed")
    click.echo(f"{_tasks(len(submitted))}: {done} completed{others}{problems}", err=True)
    if ended < len(submitted):
        click.echo(f"{_tasks(len(submitted) - ended)} did not end within --wait-timeout and "
                   f"{'goes' if len(submitted) - ended == 1 else 'go'} on; `retire-cluster task ID --wait` "
                   "waits for one again.", err=True)
    return done, ended


# -- watch ---------------------------------------------------------------------------

_HOME, _CLEAR_SCREEN, _CLEAR_TO_EOL, _CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


@click.command("watch")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between device refreshes (and between snapshots when not on a terminal).")
@click.option("--limit", type=click.IntRange(1, 1000), default=15, show_default=True, help="Tasks shown.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@client_options
def watch_cmd(interval: float, limit: int, once: bool, main_addr: str, token: Optional[str],
              as_json: bool) -> None:
    """A live view of devices and tasks, redrawn in place on a terminal; Ctrl-C quits.

    Task changes arrive as pushed updates; devices are re-read every --interval. Not on a
    terminal it prints a snapshot every --interval (with --json, one JSON object per line).
    """
    import shutil
    import time

    from .client.watch import View, render, watch

    tty = sys.stdout.isatty() and not as_json and not once

    def draw(view: Any) -> None:
        if as_json:
            click.echo(json.dumps(view.to_json(), ensure_ascii=False, sort_keys=True, indent=2 if once else None))
        elif not tty:
            click.echo(render(view, time.time()) + ("" if once else "\n"))
        else:
            size = shutil.get_terminal_size()
            lines = [cut(line, size.columns) for line in render(view, time.time()).splitlines()[: size.lines - 1]]
            click.echo(_HOME + "".join(line + _CLEAR_TO_EOL + "\n" for line in lines) + _CLEAR_BELOW, nl=False)

    client = _async_client(main_addr, token)

    async def run() -> None:
        try:
            await watch(client, View(main_addr, limit), draw, interval_s=interval, once=once,
                        redraw_on_change=tty)
        finally:
            await client.close()

    if tty:
        click.echo(_CLEAR_SCREEN, nl=False)
    try:
        _call(lambda: _run_async(run()))
    except KeyboardInterrupt:
        pass


def _run_async(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


#: Added to the ``retire-cluster`` group by :mod:`retire_cluster.cli`.
COMMANDS = [submit_cmd, status_cmd, devices_cmd, tasks_cmd, task_cmd, cancel_cmd, submit_batch_cmd, watch_cmd]
