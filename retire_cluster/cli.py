"""The ``retire-cluster`` command: the group, the main node, the token and the worker.

The client commands (submit, status, devices, tasks, task, cancel,
submit-batch, watch) live in :mod:`retire_cluster.cli_client` and are added
to the group here.

This module must import with the standard library and click alone (workers on
Termux); the main node's modules are imported inside the ``main`` command.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import click

from . import __version__
from .cli_client import COMMANDS, _fail, parse_requirements
from .protocol.errors import did_you_mean

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
    if options.get("no_http") is not None:  # RETIRE_CLUSTER_NO_HTTP=false beats the file's http_enabled: false
        given["http_enabled"] = not options["no_http"]
    overrides.update(normalise_keys(given, source="the command line"))
    if overrides.get("port") == 0 and "http_port" not in overrides:
        overrides["http_port"] = 0  # --port 0 picks free ports (tests): HTTP's too
    host_given = "host" in overrides
    if overrides.get("insecure") and not host_given:
        overrides["host"] = "127.0.0.1"
    return MainConfig().with_overrides(overrides), host_given


@cli.command("main")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="RETIRE_CLUSTER_CONFIG",
              help="JSON file with settings (keys as the long options, with underscores) "
                   "[env RETIRE_CLUSTER_CONFIG].")
@click.option("--host", envvar="RETIRE_CLUSTER_HOST", help="Address to listen on.  [default: 0.0.0.0]")
@click.option("--port", type=int, envvar="RETIRE_CLUSTER_PORT", help="TCP port.  [default: 8080]")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_DATA_DIR",
              help="Database and token.  [default: ./retire-cluster-data]")
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
              envvar="RETIRE_CLUSTER_LOG_LEVEL", help="How much to log (on stderr).  [default: info]")
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
    """Start the main node (registry, scheduler, monitor, store) on TCP, with the HTTP API and dashboard.

    Every option can also be set in the environment as RETIRE_CLUSTER_ and its name
    (RETIRE_CLUSTER_PORT=9000, RETIRE_CLUSTER_NO_HTTP=1) or in the --config file; a flag wins over
    the environment, which wins over the file.
    """
    from .main.config import ConfigError
    from .main.node import MainNode, tls_context
    from .main.store import DatabaseInUse
    from .runtime import run, setup_logging, stop_logging, tune_gc

    try:
        config, host_given = build_main_config(config_file, options)
        tls_context(config)  # a bad certificate stops here, before the log file (or anything) is created
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
        except DatabaseInUse as exc:
            _fail(str(exc))
        except OSError as exc:
            from .web import HTTPBindError

            if isinstance(exc, HTTPBindError):
                _fail(f"{exc.strerror}.")
            _fail(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
                  "is another main node running? Choose another --port.")
        # From here on the node is up: whatever happens (a stdout that is a closed pipe or a full
        # disk included), it is stopped, or its store's thread would keep the process alive.
        try:
            stop = asyncio.Event()  # first: a SIGTERM during the banner is a clean stop too
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            host, port = node.address
            shown = _lan_address() if host in ("0.0.0.0", "::", "") else host
            _say(f"retire-cluster main node {__version__} listening on {host}:{port}")
            _say(f"data dir: {config.data_dir.resolve()}")
            if node.http_address is not None:
                http_host, http_port = node.http_address
                http_shown = _lan_address() if http_host in ("0.0.0.0", "::", "") else http_host
                http_shown = f"[{http_shown}]" if ":" in http_shown else http_shown
                ask = "" if config.insecure else " (paste the token when the page asks)"
                _say(f"dashboard and HTTP API: http://{http_shown}:{http_port}/{ask}")
            pin = ""
            if node.tls_fingerprint is not None:
                from .tls import format_fingerprint

                pin = f" --tls-fingerprint {format_fingerprint(node.tls_fingerprint)}"
                _say(f"TLS certificate SHA-256 fingerprint: {format_fingerprint(node.tls_fingerprint)}")
            if config.insecure:
                _say("WARNING: --insecure: no token auth; anyone who can reach this port controls the "
                     f"cluster.{'' if host_given else ' Listening on 127.0.0.1 only (give --host to change).'}")
                _say(f"Join a device with:\n  retire-cluster worker --main {shown}:{port}{pin}")
            else:
                _say(f"Join a device with:\n  retire-cluster worker --main {shown}:{port} --token {node.token}{pin}")
            _say(None)
            tune_gc()  # after recovery: the recovered state is frozen, not rescanned
            await stop.wait()
            _say("stopping: finishing writes...")
        finally:
            await node.stop()

    try:
        run(serve())
    finally:
        stop_logging()


def _say(line: Optional[str]) -> None:
    """Print a line of the main node's banner (None: flush): a closed or full stdout must not stop the node."""
    try:
        if line is None:
            sys.stdout.flush()
        else:
            click.echo(line)
    except OSError as exc:  # BrokenPipeError (`| head`), ENOSPC: the node serves on without it
        logging.getLogger("retire_cluster.main").warning("cannot write to standard output (%s)", exc)


@cli.command("token")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_DATA_DIR",
              default="retire-cluster-data",
              help="The main node's data dir [env RETIRE_CLUSTER_DATA_DIR].  [default: ./retire-cluster-data]")
def token_cmd(data_dir: str) -> None:
    """Print the cluster token of a main node's data dir."""
    path = Path(data_dir) / "token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        token = ""
    if not token:
        _fail(f"no token in {path}; run this on the main node, with its --data-dir (or start "
              f"`retire-cluster main --data-dir {data_dir}` once to create one).")
    click.echo(token)


# -- worker ------------------------------------------------------------------


#: What a list setting of the worker's --config file holds, and an example (for the refusal).
_LIST_SETTINGS = {"allow": ("task types", '["python_eval"]'), "capabilities": ("capabilities", '["gpu"]')}


def _file_type_error(key: str, param: click.Parameter, value: Any) -> Optional[str]:
    """Why ``value`` from the worker's config file cannot be ``param``'s setting; None if it can.

    Click would convert a file value as if it were typed text: ``"max_tasks": 3.5`` became 3,
    ``"weight": true`` 1.0, and a string for a list got click's own words. The main node's
    config file refuses the wrong JSON type in one sentence; so does this one.
    """
    given = json.dumps(value)
    if param.multiple:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return None
        what, example = _LIST_SETTINGS.get(param.name or "", ("strings", '["..."]'))
        return f"{key} must be a list of {what}, like {example}, not {given}."
    is_flag = isinstance(param, click.Option) and param.is_flag
    # null means "not set" where the option has no default of its own (--max-tasks: the CPU count)
    nullable = not is_flag and not param.required and not isinstance(param.default, (str, int, float))
    if is_flag:
        what, ok = "true or false", isinstance(value, bool)
    elif isinstance(param.type, click.types.IntParamType):
        what, ok = "a whole number", type(value) is int
    elif isinstance(param.type, click.types.FloatParamType):
        what, ok = "a number", type(value) in (int, float) and math.isfinite(value)
    else:
        what, ok = "a string", isinstance(value, str)
    if not ok and not (nullable and value is None):
        return f"{key} must be {what}{' or null' if nullable else ''}, not {given}."
    return None


def _file_value_error(key: str, param: click.Parameter, value: Any, ctx: click.Context) -> Optional[str]:
    """Why ``value`` (of the right JSON type) is not allowed for ``param``: its range or choices.

    Click checks a file's value only after the fact, in the words of the flag
    ("Invalid value for '--min-battery'", under a usage line) though no flag was given.
    """
    if value is None or (isinstance(param, click.Option) and param.is_flag):
        return None
    for item in value if param.multiple else [value]:
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as exc:
            return f"{key}: {exc.message.rstrip('.')}; fix it in the config file or give the flag."
    return None


def _load_default_map(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """--config FILE: a JSON object whose keys (option names, - or _) become defaults.

    A problem with the file is one sentence and exit 2, as for the main node's --config.
    """
    if not value or ctx.resilient_parsing:
        return value
    try:
        raw = json.loads(Path(value).read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read config file {value}: {exc.strerror}.", 2)
    except ValueError as exc:
        _fail(f"config file {value} is not valid JSON: {exc}.", 2)
    if not isinstance(raw, dict):
        _fail(f"config file {value} must hold a JSON object.", 2)
    params: Dict[str, click.Parameter] = {}
    flags = []
    for p in ctx.command.params:
        if p.name and p.name != "config":
            params[p.name] = p
            for opt in p.opts:
                if opt.startswith("--"):
                    params[opt[2:].replace("-", "_")] = p
                    flags.append(opt[2:].replace("-", "_"))
    defaults = {}
    for key, val in raw.items():
        option = params.get(key.replace("-", "_"))
        if option is None:
            hint = did_you_mean(key.replace("-", "_"), flags)
            _fail(f"unknown setting {key!r} in {value}; {hint}known: {', '.join(sorted(flags))}.", 2)
        refused = _file_type_error(key, option, val) or _file_value_error(key, option, val, ctx)
        if refused is not None:
            _fail(refused, 2)
        defaults[str(option.name)] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@cli.command("worker")
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_load_default_map, envvar="RETIRE_CLUSTER_WORKER_CONFIG",
              help="JSON file of settings (keys as the long options); flags override it "
                   "[env RETIRE_CLUSTER_WORKER_CONFIG].")
@click.option("--main", "main_addr", envvar="RETIRE_CLUSTER_MAIN", required=True,
              help="Main node HOST[:PORT] [env RETIRE_CLUSTER_MAIN].")
@click.option("--token", envvar="RETIRE_CLUSTER_TOKEN", help="Cluster token [env RETIRE_CLUSTER_TOKEN].")
@click.option("--tls-fingerprint", envvar="RETIRE_CLUSTER_TLS_FINGERPRINT", metavar="SHA256",
              help="Speak TLS and accept only the main node certificate with this SHA-256 fingerprint "
                   "(as `retire-cluster main` prints it) [env RETIRE_CLUSTER_TLS_FINGERPRINT].")
@click.option("--device-id", envvar="RETIRE_CLUSTER_DEVICE_ID",
              help="Device id [env RETIRE_CLUSTER_DEVICE_ID].  [default: hostname-based, saved in the data dir]")
@click.option("--role", default="worker", show_default=True, help="Role advertised (requirements match it).")
@click.option("--allow", multiple=True, type=click.Choice(["python_eval", "command"]),
              help="Enable a task type that runs code on this device (repeatable).")
@click.option("--max-tasks", type=int, help="Concurrent tasks.  [default: the CPU cores it may use]")
@click.option("--capability", "capabilities", multiple=True, help="Extra capability to advertise (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="RETIRE_CLUSTER_WORKER_DIR",
              help="Device id, undelivered results [env RETIRE_CLUSTER_WORKER_DIR].  "
                   "[default: ~/.retire-cluster/worker]")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0, min_open=True),
              help="Override the main node's heartbeat interval (seconds).")
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
              show_default=True, help="How much the worker logs (on stderr).")
def worker_cmd(main_addr: str, token: Optional[str], tls_fingerprint: Optional[str], device_id: Optional[str],
               role: str,
               allow: Sequence[str], max_tasks: Optional[int], capabilities: Sequence[str],
               data_dir: Optional[str], heartbeat_interval: Optional[float], only_when_charging: bool,
               min_battery: Optional[float], max_battery_temp: Optional[float], max_owner_cpu: Optional[float],
               hours: Optional[str], evict: bool, task_memory: int, scratch_dir: Optional[str], weight: float,
               reconnect_max: float, burst: bool, log_level: str) -> None:
    """Join a main node and run the tasks it assigns."""
    from .runtime import LockHeld, hold_lock, run, setup_logging
    from .worker.agent import Agent
    from .worker.config import WorkerConfig, default_data_dir, parse_main_address
    from .worker.policy import PolicyConfig, parse_hours
    from .worker.sandbox import prepare_scratch_base
    from .worker.trampoline import Limits

    try:
        host, port = parse_main_address(main_addr)
        policy = PolicyConfig(
            only_when_charging=only_when_charging, min_battery_pct=min_battery,
            max_battery_temp_c=max_battery_temp, max_owner_cpu_pct=max_owner_cpu,
            hours=parse_hours(hours) if hours is not None else None, evict=evict,
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

        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            # Held until the process ends: two workers on one data dir would share one device id
            # (and knock each other off the main node) and one outbox of results.
            hold_lock(config.data_dir / "worker.lock")
            agent = Agent(config)
        except LockHeld as exc:
            _fail(f"another worker{f' (pid {exc.pid})' if exc.pid else ''} is using --data-dir {config.data_dir}; "
                  "stop it first, or give this one another --data-dir.")
        except OSError as exc:
            _fail(f"cannot use --data-dir {config.data_dir} ({exc.strerror or exc}); "
                  "give a directory this user can write.", 2)
        if set(agent.executor.task_types) - {"echo", "sleep"}:  # the types that get a scratch directory
            try:
                prepare_scratch_base(agent.executor.scratch_base)
            except OSError as exc:
                _fail(f"cannot use --scratch-dir {agent.executor.scratch_base} ({exc.strerror or exc}); "
                      "give a directory this user can write.", 2)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        click.echo(f"worker {agent.device_id} joining {host}:{port} "
                   f"(task types: {', '.join(agent.executor.task_types)}; slots: {config.slots})")
        sys.stdout.flush()
        return await agent.run()

    # uvloop when importable: a third less of the worker's CPU per task, and a round trip about
    # 17 us shorter (benchmarks/README.md), for about 2 MiB more at rest.
    sys.exit(run(serve()))


# -- client commands (retire_cluster/cli_client.py) -------------------------

for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="retire-cluster")


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["cli", "main", "parse_requirements"]
