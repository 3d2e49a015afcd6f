"""The ``retire-cluster`` command: main node, worker, and client commands.

Client commands read ``--main`` / ``--token`` from ``RETIRE_CLUSTER_MAIN`` /
``RETIRE_CLUSTER_TOKEN`` too, print tables for people and JSON with ``--json``,
and exit non-zero with one sentence on any error.

This module must import with the standard library and click alone (workers on
Termux); the main node's modules are imported inside the ``main`` command.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from . import __version__
from .protocol.errors import ProtocolError
from .protocol.messages import PRIORITY_NAMES, REQUIREMENT_KEYS, TaskStatus
from .tables import (
    DEVICE_HEADERS,
    TASK_HEADERS,
    device_row,
    format_table,
    task_detail,
    task_row,
)

EXIT_ERROR = 1
TASK_STATES = [s.value for s in TaskStatus]

# -- helpers ---------------------------------------------------------------


def _fail(message: str, code: int = EXIT_ERROR) -> None:
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
        hint = ""
        if exc.code == "unauthorized":
            hint = " (pass --token or set RETIRE_CLUSTER_TOKEN)"
        _fail(f"{exc.message}{hint}")
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
            elif key == "capabilities":
                out[key] = [c.strip() for c in value.split(",") if c.strip()]
            else:
                out[key] = value
        except ValueError:
            raise click.BadParameter(f"{key} needs a number, got {value!r}.", param_hint="--requires") from None
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


# -- the group ---------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="retire-cluster")
def cli() -> None:
    """Turn idle devices into one compute cluster.

    Start `retire-cluster main` on an always-on box, run the `retire-cluster worker ...`
    line it prints on every other device, then submit tasks.
    """


# -- main node ---------------------------------------------------------------

_MAIN_OPTIONS = {
    "host": "host", "port": "port", "data_dir": "data_dir",
    "heartbeat_interval": "heartbeat_interval_s", "offline_timeout": "offline_timeout_s",
    "insecure": "insecure", "log_level": "log_level", "log_file": "log_file",
    "synchronous": "synchronous", "strategy": "strategy",
    "http_host": "http_host", "http_port": "http_port",
    "tls_cert": "tls_cert", "tls_key": "tls_key",
}  # fmt: skip


def _lan_address() -> str:
    """The address other devices most likely reach this one at (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only a route lookup
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def build_main_config(config_file: Optional[str], options: Dict[str, Any]) -> Any:
    """MainConfig from defaults < JSON file < environment/flags (click merges those two).

    Returns (config, whether --host was given anywhere).
    """
    from .main.config import MainConfig, normalise_keys

    overrides: Dict[str, Any] = MainConfig.from_file(config_file) if config_file else {}
    given = {_MAIN_OPTIONS[k]: v for k, v in options.items() if v is not None and k != "no_http"}
    if options.get("no_http"):
        given["http_enabled"] = False
    overrides.update(normalise_keys(given, source="the command line"))
    if overrides.get("port") == 0 and "http_port" not in overrides:
        overrides["http_port"] = 0  # --port 0 picks free ports (tests): HTTP's too
    host_given = "host" in overrides
    if overrides.get("insecure") and not host_given:
        overrides["host"] = "127.0.0.1"
    return MainConfig().with_overrides(overrides), host_given


@cli.command("main")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="RETIRE_CLUSTER_CONFIG",
              help="JSON file with settings (keys as the long options, with underscores).")
@click.option("--host", envvar="RETIRE_CLUSTER_HOST", help="Address to listen on.  [default: 0.0.0.0]")
@click.option("--port", type=int, envvar="RETIRE_CLUSTER_PORT", help="TCP port.  [default: 8080]")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_DATA_DIR",
              help="Database, token and logs.  [default: ./retire-cluster-data]")
@click.option("--heartbeat-interval", type=float, envvar="RETIRE_CLUSTER_HEARTBEAT_INTERVAL",
              help="Seconds between worker heartbeats.  [default: 60]")
@click.option("--offline-timeout", type=float, envvar="RETIRE_CLUSTER_OFFLINE_TIMEOUT",
              help="Seconds of silence before a device is offline and its tasks requeued.  [default: 300]")
@click.option("--insecure", is_flag=True, default=None, envvar="RETIRE_CLUSTER_INSECURE",
              help="No token auth; listens on 127.0.0.1 unless --host is given.")
@click.option("--strategy", envvar="RETIRE_CLUSTER_STRATEGY",
              type=click.Choice(["least_loaded", "round_robin", "weighted_round_robin", "least_connections",
                                 "response_time"]),
              help="How a device is chosen among those that match.  [default: least_loaded]")
@click.option("--synchronous", type=click.Choice(["full", "normal"]), envvar="RETIRE_CLUSTER_SYNCHRONOUS",
              help="SQLite durability: full survives power loss, normal only crashes.  [default: full]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              envvar="RETIRE_CLUSTER_LOG_LEVEL", help="[default: info]")
@click.option("--log-file", type=click.Path(dir_okay=False), envvar="RETIRE_CLUSTER_LOG_FILE",
              help="Also log to this file, rotated at 10 MiB (5 kept).")
@click.option("--http-host", envvar="RETIRE_CLUSTER_HTTP_HOST",
              help="Address of the HTTP API and dashboard.  [default: as --host]")
@click.option("--http-port", type=int, envvar="RETIRE_CLUSTER_HTTP_PORT",
              help="Port of the HTTP API and dashboard.  [default: 5000; a free one with --port 0]")
@click.option("--no-http", is_flag=True, default=None, envvar="RETIRE_CLUSTER_NO_HTTP",
              help="Serve no HTTP API, metrics or dashboard.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), envvar="RETIRE_CLUSTER_TLS_CERT",
              help="PEM certificate: speak TLS only (workers pin its fingerprint). Needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), envvar="RETIRE_CLUSTER_TLS_KEY",
              help="PEM private key of --tls-cert.")
def main_cmd(config_file: Optional[str], **options: Any) -> None:
    """Start the main node (registry, scheduler, monitor, store) on TCP, with the HTTP API and dashboard."""
    from .main.config import ConfigError
    from .main.node import MainNode
    from .runtime import run, setup_logging, stop_logging, tune_gc

    try:
        config, host_given = build_main_config(config_file, options)
    except (ConfigError, TypeError, ValueError) as exc:
        _fail(str(exc), 2)
    setup_logging(config.log_level, config.log_file)

    async def serve() -> None:
        import asyncio

        node = MainNode(config)
        try:
            try:
                await node.start()
            except OSError as exc:
                from .main.config import MainConfig
                from .web import HTTPBindError

                if not isinstance(exc, HTTPBindError) or config.http_port != MainConfig.http_port:
                    raise
                # Port 5000 is often taken (macOS AirPlay): the cluster matters more than its dashboard.
                click.echo(f"WARNING: {exc.strerror}; starting without the dashboard.", err=True)
                node = MainNode(config.with_overrides({"http_enabled": False}))
                await node.start()
        except ConfigError as exc:
            _fail(str(exc), 2)
        except OSError as exc:
            from .web import HTTPBindError

            if isinstance(exc, HTTPBindError):
                _fail(f"{exc.strerror}.")
            _fail(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
                  "is another main node running? Choose another --port.")
        host, port = node.address
        shown = _lan_address() if host in ("0.0.0.0", "::", "") else host
        click.echo(f"retire-cluster main node {__version__} listening on {host}:{port}")
        click.echo(f"data dir: {config.data_dir.resolve()}")
        if node.http_address is not None:
            http_host, http_port = node.http_address
            http_shown = _lan_address() if http_host in ("0.0.0.0", "::", "") else http_host
            http_shown = f"[{http_shown}]" if ":" in http_shown else http_shown
            ask = "" if config.insecure else " (paste the token when the page asks)"
            click.echo(f"dashboard and HTTP API: http://{http_shown}:{http_port}/{ask}")
        pin = ""
        if node.tls_fingerprint is not None:
            from .tls import format_fingerprint

            pin = f" --tls-fingerprint {format_fingerprint(node.tls_fingerprint)}"
            click.echo(f"TLS certificate SHA-256 fingerprint: {format_fingerprint(node.tls_fingerprint)}")
        if config.insecure:
            click.echo("WARNING: --insecure: no token auth; anyone who can reach this port controls the "
                       f"cluster.{'' if host_given else ' Listening on 127.0.0.1 only (give --host to change).'}")
            click.echo(f"Join a device with:\n  retire-cluster worker --main {shown}:{port}{pin}")
        else:
            click.echo(f"Join a device with:\n  retire-cluster worker --main {shown}:{port} --token {node.token}{pin}")
        sys.stdout.flush()
        tune_gc()  # after recovery: the recovered state is frozen, not rescanned
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        click.echo("stopping: finishing writes...")
        await node.stop()

    try:
        run(serve())
    finally:
        stop_logging()


@cli.command("token")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_DATA_DIR",
              default="retire-cluster-data", show_default=True, help="The main node's data dir.")
def token_cmd(data_dir: str) -> None:
    """Print the cluster token of a main node's data dir."""
    path = Path(data_dir) / "token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        token = ""
    if not token:
        _fail(f"no token in {data_dir}; start `retire-cluster main --data-dir {data_dir}` once to create it.")
    click.echo(token)


# -- worker ------------------------------------------------------------------


def _load_default_map(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """--config FILE: a JSON object whose keys (option names, - or _) become defaults."""
    if not value:
        return value
    try:
        raw = json.loads(Path(value).read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}.") from None
    except ValueError as exc:
        raise click.BadParameter(f"{value} is not valid JSON ({exc}).") from None
    if not isinstance(raw, dict):
        raise click.BadParameter(f"{value} must hold a JSON object.")
    names: Dict[str, str] = {}
    for p in ctx.command.params:
        if p.name and p.name != "config":
            names[p.name] = p.name
            for opt in p.opts:
                if opt.startswith("--"):
                    names[opt[2:].replace("-", "_")] = p.name
    defaults = {}
    for key, val in raw.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"unknown setting {key!r} in {value}.")
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@cli.command("worker")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_default_map, envvar="RETIRE_CLUSTER_WORKER_CONFIG",
              help="JSON file of settings (keys as the long options); flags override it.")
@click.option("--main", "main_addr", envvar="RETIRE_CLUSTER_MAIN", required=True,
              help="Main node HOST[:PORT] [env RETIRE_CLUSTER_MAIN].")
@click.option("--token", envvar="RETIRE_CLUSTER_TOKEN", help="Cluster token [env RETIRE_CLUSTER_TOKEN].")
@click.option("--tls-fingerprint", envvar="RETIRE_CLUSTER_TLS_FINGERPRINT", metavar="SHA256",
              help="Speak TLS and accept only the main node certificate with this SHA-256 fingerprint "
                   "(as `retire-cluster main` prints it).")
@click.option("--device-id", envvar="RETIRE_CLUSTER_DEVICE_ID",
              help="Device id.  [default: hostname-based, saved in the data dir]")
@click.option("--role", default="worker", show_default=True, help="Role advertised (requirements match it).")
@click.option("--allow", multiple=True, type=click.Choice(["python_eval", "command"]),
              help="Enable a task type that runs code on this device (repeatable).")
@click.option("--max-tasks", type=int, help="Concurrent tasks.  [default: CPU cores]")
@click.option("--capability", "capabilities", multiple=True, help="Extra capability to advertise (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_WORKER_DIR",
              help="Device id, undelivered results.  [default: ~/.retire-cluster/worker]")
@click.option("--heartbeat-interval", type=float, help="Override the main node's heartbeat interval.")
@click.option("--only-when-charging", is_flag=True, help="Take tasks only while on a charger.")
@click.option("--min-battery", type=click.FloatRange(0, 100), metavar="PCT",
              help="Take tasks only above this battery level (resumes 5 points higher).")
@click.option("--max-battery-temp", type=float, metavar="C",
              help="Stop taking tasks above this battery temperature (resumes 2 degrees lower).")
@click.option("--max-owner-cpu", type=click.FloatRange(1, 100), metavar="PCT",
              help="Stop taking tasks while the owner uses more CPU than this (resumes 10 points lower).")
@click.option("--hours", metavar="HH:MM-HH:MM", help="Take tasks only in this local time window, e.g. 22:00-07:00.")
@click.option("--evict", is_flag=True, help="Stop running tasks (handing them back) when a rule says stop.")
@click.option("--task-memory", type=click.IntRange(16), default=1024, show_default=True, metavar="MiB",
              help="Address-space limit of python_eval and command processes.")
@click.option("--scratch-dir", type=click.Path(file_okay=False),
              help="Where per-task scratch directories go.  [default: <tmp>/retire-cluster-<uid>]")
@click.option("--weight", type=click.FloatRange(0.001, 1000), default=1.0, show_default=True,
              help="Share of work under --strategy weighted_round_robin on the main node.")
@click.option("--reconnect-max", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Longest wait between reconnection attempts, in seconds.")
@click.option("--burst", is_flag=True, help="Exit once idle after running at least one task.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def worker_cmd(main_addr: str, token: Optional[str], tls_fingerprint: Optional[str], device_id: Optional[str],
               role: str,
               allow: Sequence[str], max_tasks: Optional[int], capabilities: Sequence[str],
               data_dir: Optional[str], heartbeat_interval: Optional[float], only_when_charging: bool,
               min_battery: Optional[float], max_battery_temp: Optional[float], max_owner_cpu: Optional[float],
               hours: Optional[str], evict: bool, task_memory: int, scratch_dir: Optional[str], weight: float,
               reconnect_max: float, burst: bool, log_level: str) -> None:
    """Join a main node and run the tasks it assigns."""
    from .runtime import run, setup_logging
    from .worker.agent import Agent
    from .worker.config import WorkerConfig, default_data_dir, parse_main_address
    from .worker.policy import PolicyConfig, parse_hours
    from .worker.trampoline import Limits

    try:
        host, port = parse_main_address(main_addr)
        policy = PolicyConfig(
            only_when_charging=only_when_charging, min_battery_pct=min_battery,
            max_battery_temp_c=max_battery_temp, max_owner_cpu_pct=max_owner_cpu,
            hours=parse_hours(hours) if hours else None, evict=evict,
        )  # fmt: skip
        config = WorkerConfig(
            main_host=host, main_port=port, token=token, device_id=device_id, role=role,
            allow=frozenset(allow), max_tasks=max_tasks,
            data_dir=Path(data_dir) if data_dir else default_data_dir(),
            heartbeat_interval_s=heartbeat_interval, capabilities=tuple(capabilities), burst=burst,
            policy=policy, weight=weight, reconnect_max_s=reconnect_max,
            limits=Limits(memory_bytes=task_memory * 1024**2),
            scratch_dir=Path(scratch_dir) if scratch_dir else None, tls_fingerprint=tls_fingerprint,
        )  # fmt: skip
    except ValueError as exc:
        _fail(str(exc), 2)
    setup_logging(log_level)

    async def serve() -> int:
        import asyncio

        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        click.echo(f"worker {agent.device_id} joining {host}:{port} "
                   f"(task types: {', '.join(agent.executor.task_types)}; slots: {config.slots})")
        sys.stdout.flush()
        return await agent.run()

    # One connection: uvloop would only cost the phone another MiB of memory.
    sys.exit(run(serve(), fast_loop=False))


# -- client commands -----------------------------------------------------------


@cli.command("submit")
@click.argument("task_type")
@click.option("--payload", default="{}", show_default=True, help="Task payload, a JSON object.")
@click.option("--priority", help="low, normal, high, urgent or 0-100.  [default: normal]")
@click.option("--timeout", type=float, help="Seconds before the task ends as timeout.  [default: 3600]")
@click.option("--requires", multiple=True, metavar="KEY=VALUE",
              help=f"Requirement (repeatable): {', '.join(sorted(REQUIREMENT_KEYS))}.")
@click.option("--max-retries", type=click.IntRange(0, 100), help="Retries after a lost device.  [default: 3]")
@click.option("--idempotency-key", help="Submitting twice with the same key returns the first task.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@client_options
def submit_cmd(task_type: str, payload: str, priority: Optional[str], timeout: Optional[float],
               requires: Sequence[str], max_retries: Optional[int], idempotency_key: Optional[str],
               wait: bool, main_addr: str, token: Optional[str], as_json: bool) -> None:
    """Submit a task of TASK_TYPE (echo, sleep, python_eval, command, ...)."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); pass an object such as "
                                 "'{\"message\": \"hi\"}'.", param_hint="--payload") from None
    if not isinstance(body, dict):
        raise click.BadParameter("must be a JSON object such as '{\"message\": \"hi\"}'.", param_hint="--payload")
    if timeout is not None and timeout <= 0:
        raise click.BadParameter("must be more than 0 seconds.", param_hint="--timeout")
    options = {
        "priority": _priority(priority), "timeout": timeout, "requirements": parse_requirements(requires),
        "max_retries": max_retries, "idempotency_key": idempotency_key,
    }  # fmt: skip
    if not options["requirements"]:
        options["requirements"] = None
    with _client(main_addr, token) as client:
        task_id = _call(lambda: client.submit(task_type, body, **options))
        if not wait:
            if as_json:
                _emit({"task_id": task_id})
            else:
                click.echo(task_id)
            return
        record = _call(lambda: client.wait(task_id))
    if as_json:
        _emit(record)
    else:
        _print_outcome(record)
    if record.get("status") != "completed":
        sys.exit(EXIT_ERROR)


def _print_outcome(record: Dict[str, Any]) -> None:
    result = record.get("result") or {}
    if record.get("status") == "completed":
        output = result.get("output")
        click.echo("" if output is None else output)
        if result.get("truncated"):
            click.echo("(output truncated)", err=True)
        return
    reason = record.get("error") or result.get("error") or "no details"
    click.echo(f"task {record.get('task_id')} {record.get('status')}: {reason}", err=True)
    if result.get("stderr"):
        click.echo(result["stderr"].rstrip(), err=True)


@cli.command("status")
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


@cli.command("devices")
@click.option("--status", type=click.Choice(["online", "offline"]), help="Only devices in this state.")
@client_options
def devices_cmd(status: Optional[str], main_addr: str, token: Optional[str], as_json: bool) -> None:
    """List devices: status, role, load, battery, active tasks, last seen."""
    with _client(main_addr, token) as client:
        devices = _call(lambda: client.devices(status))
    if as_json:
        _emit(devices)
        return
    if not devices:
        click.echo("no devices yet; start `retire-cluster worker --main ... --token ...` on one.")
        return
    click.echo(format_table(DEVICE_HEADERS, [device_row(d) for d in devices]))


@cli.command("tasks")
@click.option("--status", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@click.option("--device", help="Only tasks assigned to this device.")
@click.option("--type", "task_type", help="Only tasks of this type.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
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


@cli.command("task")
@click.argument("task_id")
@client_options
def task_cmd(task_id: str, main_addr: str, token: Optional[str], as_json: bool) -> None:
    """Show one task: every field, its result, and every attempt (device, times, outcome)."""
    with _client(main_addr, token) as client:
        record = _call(lambda: client.status(task_id))
    if as_json:
        _emit(record)
    else:
        click.echo(task_detail(record))


@cli.command("cancel")
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


@cli.command("submit-batch")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--concurrency", type=click.IntRange(1, 10000), default=64, show_default=True,
              help="Submissions in flight at once on the connection.")
@click.option("--wait", is_flag=True, help="Wait for every task, then print how each ended.")
@click.option("--on-error", type=click.Choice(["skip", "abort"]), default="skip", show_default=True,
              help="A bad line or a refused task: report it and go on, or stop.")
@client_options
def submit_batch_cmd(file: Any, concurrency: int, wait: bool, on_error: str, main_addr: str,
                     token: Optional[str], as_json: bool) -> None:
    """Submit one task per line of FILE (JSON Lines; - reads stdin).

    Each line is an object such as {"task_type": "echo", "payload": {"message": "hi"}}, optionally
    with priority, timeout, requirements, max_retries, retry_on_timeout, idempotency_key. Blank lines
    and lines starting with # are skipped. Prints the task ids (with --wait, how each ended) and a
    summary on stderr. Exits 1 if any line was not submitted or any task did not complete; 2 when
    --on-error abort stops at a bad line (then nothing is sent).
    """
    from .client.batch import read_batch, submit_batch

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
    problems = f"; {len(errors)} lines refused or skipped" if errors else ""
    if not_sent:
        problems += f"; {not_sent} not sent after the error (--on-error abort)"
    if wait:
        done = _wait_and_report(main_addr, token, submitted, report, problems, as_json)
        sys.exit(EXIT_ERROR if errors or not_sent or done < len(submitted) else 0)
    if as_json:
        _emit(report)
    else:
        for _, task_id in submitted:
            click.echo(task_id)
    click.echo(f"submitted {len(submitted)} tasks{problems}", err=True)
    sys.exit(EXIT_ERROR if errors or not_sent else 0)


def _wait_and_report(main_addr: str, token: Optional[str], submitted: List[Any], report: Dict[str, Any],
                     problems: str, as_json: bool) -> int:
    """`submit-batch --wait`: wait for all, print how each ended; return how many completed."""
    from .client.batch import summarise, wait_batch

    client = _async_client(main_addr, token)

    async def gather() -> Dict[str, Dict[str, Any]]:
        try:
            await client.connect()
            with click.progressbar(length=len(submitted), label="waiting", file=sys.stderr) as bar:
                return await wait_batch(client, [t for _, t in submitted], progress=bar.update)
        finally:
            await client.close()

    records = _call(lambda: _run_async(gather()))
    rows, results, counts = summarise(submitted, records)
    done = int(counts.get("completed", 0))
    if as_json:
        report.update(results=results, counts=counts)
        _emit(report)
    elif rows:
        click.echo(format_table(["line", "task", "status", "output / error"], rows))
    others = "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s != "completed")
    click.echo(f"{len(submitted)} tasks: {done} completed{others}{problems}", err=True)
    return done


# -- watch ---------------------------------------------------------------------------

_HOME, _CLEAR_SCREEN, _CLEAR_TO_EOL, _CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


@cli.command("watch")
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
            lines = [line[: size.columns] for line in render(view, time.time()).splitlines()[: size.lines - 1]]
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="retire-cluster")


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["cli", "main", "parse_requirements"]
