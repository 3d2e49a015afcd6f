"""The single round trip with this VM's idle CPUs halting at once, and polling a while first as Linux guests do by default.

    python benchmarks/halt_polling.py [--quick] [--round-trips N] [--rounds N] [--poll-ns NS]

A waited round trip (submit one `echo` task with `wait`, read the reply that
carries its result) wakes a sleeping process or thread six times: the main
node's event loop (twice), the worker, the main node's SQLite thread, the
event loop again when the commit ends, and the client. On a 2-CPU machine
the one woken is often on the other CPU, idle. On bare metal an idle core
wakes in a few microseconds. In a KVM guest, an idle virtual CPU that halts
is a descheduled thread of the host, and waking it costs a VM exit and the
host's scheduler. Linux guests therefore poll for a while before they halt
(the `haltpoll` cpuidle driver, `guest_halt_poll_ns`, 200,000 ns by
default). This VM's kernel command line sets `haltpoll.guest_halt_poll_ns=0`:
every idle virtual CPU halts at once.

This script measures the round trip p50 of our main node with one real
worker (as `tasks.py`'s waited round trips) and of `durable_floor.py`'s
throwaway node (the same frames and commit, nothing else), every process
free on every CPU, alternating `--rounds` times between the machine's own
setting and `--poll-ns` (the kernel's default, 200,000, unless told), and
prints the median of each side's p50s. It changes
`/sys/module/haltpoll/parameters/guest_halt_poll_ns` for the measures only,
so it needs root, and puts the machine's own value back when it ends (an
error or Ctrl-C included; SIGTERM too). Neither node is changed: this is
how much of the round trip is this VM's idle CPUs, not our code. Talks to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from _harness import HALT_POLL_KNOB as KNOB
from _harness import emit
from placement import compare, floor, ours

#: Linux's own default for guest_halt_poll_ns (drivers/cpuidle/governors/haltpoll.c).
LINUX_DEFAULT_NS = 200_000
FREE = (None, None, None)


def check_knob() -> int:
    """The machine's own setting; exits with what to do when it cannot be read or changed."""
    if not KNOB.exists():
        sys.exit(f"halt_polling.py compares the halt polling of a KVM guest's idle CPUs, and {KNOB} does not "
                 "exist here (the cpuidle driver is not haltpoll): there is nothing to compare on this machine.")
    own = int(KNOB.read_text())
    try:
        KNOB.write_text(str(own))
    except OSError as exc:
        sys.exit(f"halt_polling.py cannot write {KNOB} ({exc.strerror}); run it as root.")
    return own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 round trips per measure, 2 rounds")
    ap.add_argument("--round-trips", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="measures of each setting, alternating")
    ap.add_argument("--poll-ns", type=int, default=LINUX_DEFAULT_NS,
                    help=f"the polling to compare with the machine's own (default {LINUX_DEFAULT_NS:,}: Linux's)")
    args = ap.parse_args()
    if args.poll_ns < 0:
        ap.error("--poll-ns must be 0 or more")
    own = check_knob()
    count, rounds = (300, 2) if args.quick else (args.round_trips, args.rounds)
    settings = {f"halting at once (this machine's setting, {own:,} ns)" if own == 0 else
                f"this machine's setting ({own:,} ns)": own,
                f"polling {args.poll_ns:,} ns before halting": args.poll_ns}
    # SIGTERM ends the script as Ctrl-C does, through the finally that puts the setting back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("halt_polling.py: terminated; the setting is put back."))
    p50s: dict[str, dict[str, list[float]]] = {"ours": {}, "floor": {}}
    try:
        for _ in range(rounds):
            for name, ns in settings.items():
                KNOB.write_text(str(ns))
                p50s["ours"].setdefault(name, []).append(ours(FREE, count))
                p50s["floor"].setdefault(name, []).append(floor(FREE, count))
    finally:
        KNOB.write_text(str(own))
    table: list[tuple[str, Any]] = []
    results: list[dict[str, Any]] = []
    for name, ns in settings.items():
        text, result = compare(p50s, name)
        table.append((name, text))
        results.append({"guest_halt_poll_ns": ns, **result})
    emit("halt_polling", table, {"round_trips": count, "rounds": rounds, "machine_halt_poll_ns": own,
                                 "results": results})


if __name__ == "__main__":
    main()
