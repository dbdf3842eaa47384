"""Failure-policy benchmark (issue 4): prints one JSON object with every figure and its target.

Run: `python benchmarks/faults.py [--quick] [--rate 250] [--strategy NAME] [--faults a,b]`.

A fresh daemon in a temporary ENGCTL_HOME, with `[daemon] policy_interval = 0.25` and
`sample_interval = 0.5` in its config.toml (the defaults are 1 s each: a policy would act up to
a second later). Every phase registers a fresh engine of 4 instances of
benchmarks/faulty_worker.py (type "echo", max_concurrency 1, ~2 ms per request), so no phase
inherits another's counters, weights or isolations, and unregisters it at the end. The
engine-level policy overrides are in POLICY below (hang.ping_timeout 0.5 s, memory.leak_window
6 s, failing.window 2 s); the effective policy is printed under settings.effective_policy.

Load: 8 client threads (each its own `Client`, so at most 8 requests in flight) send one
Poisson stream (seeded; a strictly periodic one resonates with the 2 ms service time and
skews least_loaded's tie-breaking) of `Client.exec(i, engine=..., retries=2, timeout=1.0)` at
`--rate` requests per second (default 250: the slow instance, 20 ms a request, could then take
20 % of the traffic, so its share is up to the policy, not capped by its own capacity), bounded
by `rate × phase length`; loopback (Unix socket) only. Each request's send time, instance, ok
and attempts are kept. A phase lasts until the action (and, for a restart, the new process's
ready) plus 2 s (1 s with --quick), and at least 1,000 requests after the injection.

Injection: after a 1.5 s warm-up (1 s with --quick), a control request `{"fault": NAME}` is
routed to `ENGINE#1` (the `instance` filter of `Client.exec`) on its own connection; the worker
answers it and switches that process into the fault (see faulty_worker.py): crash, hang, slow
(10×), failing (every 2nd request raises), leak (10 MiB/s, limits.max_rss 150 MiB). "leak" runs
with the steady-growth rule; "leak_over_max_rss" turns that rule off (leak_rate 0) so only the
max_rss rule can act; "slow_policy_off" (not in --quick) is a baseline with the slow policy off:
what the strategy alone does with a slow instance.

A monitor thread polls `status.get` (0.1 s), `events.list` (0.2 s) and the sick process's RSS
with psutil (0.05 s). Per fault the JSON gives:
- `time_to_action_s`: from the control request's answer to the policy's event (`at`, daemon
  clock): crash → instance.state to backoff; hang → instance.hung; slow →
  instance.downweighted; failing → instance.isolated; leak → instance.draining;
- `requests_to_sick_until_action`: requests sent in that interval that ended on the sick
  instance or needed a retry (a retry's first attempt was on the sick instance: it is the only
  one failing); `daemon_attempts_until_action`: attempts the daemon counted on it (its
  counters read at the injection and ≤ 0.1 s after the action);
- `share_after_action`: the sick instance's share of the requests sent from the action to the
  end of the phase (a restarted process is healthy again, so for crash, hang and leak also
  `share_while_out`, from the action until 5 ms before it is ready again);
- `success_rate`: client-visible, over the requests sent from the injection on, with retries 2;
- slow: `share_from_5s` (requests sent from 5 s after the injection on), a per-second share
  timeline and every weight change; leak: the peak RSS seen (psutil, and the daemon's figure in
  its event) against 2 × max_rss; crash, hang, leak: `unexpected_exits_after_action` (the new
  process dying again, which should not happen).

Targets: success rate ≥ 99.9 % for crash, failing and slow; the slow instance's share from 5 s
on ≤ 10 %; each leak restarted before its RSS passed 2 × max_rss. The daemon, every process
and the temporary home are removed at the end, even on error or SIGTERM. `--quick` shortens
the phases and skips the slow_policy_off baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import psutil
from common import (
    all_ready,
    exit_cleanly_on_sigterm,
    machine_info,
    source_state,
    wait_for,
)
from common import (
    stop_daemon as stop_home_daemon,
)

from engctl.client import Client
from engctl.errors import DaemonUnreachableError, EngctlError

PY = sys.executable
WORKER = str(Path(__file__).with_name("faulty_worker.py"))
TYPE = "echo"
INSTANCES = 4
SICK = 1  # the instance index that gets the fault
THREADS = 8
TIMEOUT = 1.0
RETRIES = 2
BASE_MS = 2.0
LEAK_MIB_S = 10.0
MAX_RSS = 150 * 2**20
MAX_COUNT = 1_000_000

DAEMON_CONFIG = {"policy_interval": 0.25, "sample_interval": 0.5}
# Engine-level policy overrides (everything else is the built-in default; the effective policy
# as the daemon resolved it is printed under settings.effective_policy).
POLICY: dict[str, Any] = {
    "hang": {"ping_timeout": 0.5},  # default 2 s
    # default 60 s. Not shorter: the growth rule wants samples spanning 90 % of the window, and
    # the oldest sample in it is at most window - sample_interval old (jitter makes each
    # interval a little longer), so with leak_window < 10 × sample_interval it never acts.
    "memory": {"leak_window": 6.0},
    "failing": {"window": 2.0},  # default 30 s
}

TARGET_SUCCESS = 0.999
TARGET_SLOW_SHARE = 0.10
TARGET_SLOW_WITHIN_S = 5.0


def engine_spec(policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": TYPE,
        "command": [PY, WORKER],
        "mode": "worker",
        "instances": INSTANCES,
        "max_concurrency": 1,
        "env": {"FAULTY_BASE_MS": str(BASE_MS), "FAULTY_LEAK_MIB_S": str(LEAK_MIB_S)},
        "restart": {"start_seconds": 0.2},
        "limits": {"max_rss": f"{MAX_RSS // 2**20}MiB"},
        "policy": policy,
    }


# -- load ------------------------------------------------------------------------------------
class Load:
    """THREADS client threads sending one paced stream of requests (at most THREADS in flight).

    records: (sent wall time, instance or None, ok, attempts, error class name or "").
    """

    def __init__(self, home: str, engine: str, rate: float, max_count: int, seed: int) -> None:
        self.home = home
        self.engine = engine
        self.rate = rate
        self.max_count = max_count
        self.records: list[tuple[float, str | None, bool, int, str]] = []
        self.errors: list[str] = []  # connection-level trouble (not a request's failure)
        self._next = 0
        self._due = 0.0  # seconds after start of the next request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"load-{k}", daemon=True)
            for k in range(THREADS)
        ]
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT * 3 + 5)

    def sent_since(self, t: float) -> int:
        return sum(1 for r in self.records if r[0] >= t)

    def _run(self) -> None:
        with Client(self.home, autostart=False) as c:
            while not self._stop.is_set():
                with self._lock:
                    i = self._next
                    self._next += 1
                    due = self._due
                    self._due += self._rng.expovariate(self.rate)
                if i >= self.max_count:
                    return
                delay = self._t0 + due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                sent = time.time()
                obj: dict[str, Any]
                try:
                    result = c.exec(i, engine=self.engine, timeout=TIMEOUT, retries=RETRIES)
                    obj, err = cast("dict[str, Any]", result), ""
                except DaemonUnreachableError as exc:
                    self.errors.append(str(exc))
                    return
                except EngctlError as exc:
                    obj, err = exc.data, type(exc).__name__
                self.records.append(
                    (sent, obj.get("instance"), bool(obj.get("ok")), obj.get("attempts") or 0, err)
                )


# -- observation -----------------------------------------------------------------------------
class Monitor:
    """Polls status (0.1 s), events (0.2 s) and the RSS of one pid (0.05 s) in a thread."""

    def __init__(self, home: str, engine: str, since: float) -> None:
        self.home = home
        self.engine = engine
        self.since = since
        self.snaps: list[tuple[float, dict[str, dict[str, Any]]]] = []
        self.events: list[dict[str, Any]] = []
        self.rss: list[tuple[float, int, int]] = []  # (time, pid, rss bytes)
        self.watch_pid: int | None = None
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        proc: psutil.Process | None = None
        k = 0
        with Client(self.home, autostart=False) as c:
            while not self._stop.wait(0.05):
                k += 1
                pid = self.watch_pid
                if pid is not None:
                    try:
                        if proc is None or proc.pid != pid:
                            proc = psutil.Process(pid)
                        self.rss.append((time.time(), pid, proc.memory_info().rss))
                    except psutil.Error:
                        proc = None
                try:
                    if k % 2 == 0:
                        doc = cast("dict[str, Any]", c.status([self.engine]))
                        st = doc["engines"][0]["instances"]
                        self.snaps.append((time.time(), {i["id"]: i for i in st}))
                    if k % 4 == 0:
                        events = c.events(engine=self.engine, since=self.since, limit=5000)
                        self.events = cast("list[dict[str, Any]]", events)
                except EngctlError as exc:
                    self.errors.append(str(exc))
                    if isinstance(exc, DaemonUnreachableError):
                        return


def first_event(
    events: list[dict[str, Any]],
    inst: str,
    kinds: tuple[str, ...],
    after: float,
    to: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    for ev in events:
        if (
            ev["instance"] == inst
            and ev["kind"] in kinds
            and ev["at"] >= after
            and (not to or ev.get("to") in to)
        ):
            return ev
    return None


# What counts as "the policy acted", per fault: (event kinds, instance.state targets).
ACTION: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "crash": (("instance.state",), ("backoff", "fatal")),
    "hang": (("instance.hung",), ()),
    "slow": (("instance.downweighted",), ()),
    "slow_policy_off": (("instance.downweighted",), ()),
    "failing": (("instance.isolated",), ()),
    "leak": (("instance.draining",), ()),
    "leak_over_max_rss": (("instance.draining",), ()),
}
# Faults whose process is replaced: the phase waits for the new one to be ready.
RESTARTS = ("crash", "hang", "leak", "leak_over_max_rss")
POLICY_KINDS = (
    "instance.isolated",
    "instance.downweighted",
    "instance.weight_restored",
    "instance.hung",
    "instance.draining",
    "instance.returned",
    "instance.restored",
    "policy.guard_rail",
    "instance.health",
)


# -- one phase ---------------------------------------------------------------------------------
def run_phase(
    c: Client,
    home: str,
    fault: str,
    spec: dict[str, Any],
    args: argparse.Namespace,
    worker_pids: set[int],
) -> dict[str, Any]:
    name = f"f-{fault.replace('_', '-')}"
    sick = f"{name}#{SICK}"
    inject_as = "slow" if fault == "slow_policy_off" else fault.removesuffix("_over_max_rss")
    phase_start = time.time()
    c.register({name: spec})
    wait_for(lambda: all_ready(c, name, INSTANCES), 30)
    insts = cast("dict[str, Any]", c.status([name]))["engines"][0]["instances"]
    worker_pids.update(i["pid"] for i in insts)
    sick_pid = next(i["pid"] for i in insts if i["id"] == sick)

    max_s = args.phase_max + (20.0 if fault == "leak_over_max_rss" else 0.0)
    count = min(MAX_COUNT, int(args.rate * (args.warmup + max_s)))
    load = Load(home, name, args.rate, count, seed=sorted(ACTION).index(fault))
    mon = Monitor(home, name, phase_start)
    mon.watch_pid = sick_pid
    out: dict[str, Any] = {"engine": name, "sick_instance": sick}
    try:
        mon.start()
        load.start()
        time.sleep(args.warmup)
        with Client(home, autostart=False) as ctl:
            before = time.time()
            ctl.exec({"fault": inject_as}, instance=sick, timeout=5.0)
            t_inject = time.time()
            # The counters as the fault starts (the control request is in them already).
            doc = cast("dict[str, Any]", ctl.status([name]))
            snap_inject = {i["id"]: i for i in doc["engines"][0]["instances"]}
        out["inject_rtt_ms"] = round((t_inject - before) * 1000, 2)

        kinds, to = ACTION[fault]
        deadline = t_inject + max_s
        act = back = None
        while time.time() < deadline:
            time.sleep(0.05)
            act = act or first_event(mon.events, sick, kinds, t_inject, to)
            if fault in RESTARTS and act is not None:
                back = back or first_event(
                    mon.events, sick, ("instance.state",), act["at"], ("ready",)
                )
            if fault.startswith("slow"):
                done_at = t_inject + args.slow_after
            elif act is None or (fault in RESTARTS and back is None):
                continue
            else:
                done_at = (back or act)["at"] + args.after
            # Enough requests after the injection for the success rate to resolve 0.1 %.
            if time.time() >= done_at and load.sent_since(t_inject) >= args.min_requests:
                break
        t_end = time.time()
    finally:
        load.stop()
        mon.stop()
        worker_pids.update(i["pid"] for _, s in mon.snaps for i in s.values() if i["pid"])
    events = cast("list[dict[str, Any]]", c.events(engine=name, since=phase_start, limit=5000))
    c.unregister([name])

    act = first_event(events, sick, kinds, t_inject, to)
    recs = [r for r in load.records if r[0] >= t_inject]
    pre = [r for r in load.records if r[0] < t_inject]
    out["requests"] = len(recs)
    out["requests_before_injection"] = len(pre)
    out["phase_after_injection_s"] = round(t_end - t_inject, 2)
    out["share_before_injection"] = share(pre, sick)
    out["served_before_injection"] = dict(sorted(Counter(r[1] for r in pre if r[1]).items()))
    ok = sum(1 for r in recs if r[2])
    out["success_rate"] = round(ok / len(recs), 5) if recs else None
    out["failed"] = len(recs) - ok
    out["failures_by_error"] = dict(Counter(r[4] for r in recs if not r[2]))
    out["retried_ok"] = sum(1 for r in recs if r[2] and r[3] > 1)
    out["acted"] = act is not None
    if act is not None:
        t_act = act["at"]
        until = [r for r in recs if r[0] < t_act]
        after = [r for r in recs if r[0] >= t_act]
        out["action"] = {"kind": act["kind"], "to": act.get("to"), "reason": act["reason"]}
        out["time_to_action_s"] = round(t_act - t_inject, 3)
        out["requests_to_sick_until_action"] = sum(1 for r in until if r[1] == sick or r[3] > 1)
        out["daemon_attempts_until_action"] = attempts_until(snap_inject, mon.snaps, sick, t_act)
        out["share_after_action"] = share(after, sick)
        if fault == "failing":  # isolated for longer than the phase: none should reach it
            out["sick_served_after_action_at"] = [
                round(r[0] - t_inject, 4) for r in after if r[1] == sick
            ][:10]
        out["requests_after_action"] = len(after)
    if fault in RESTARTS and act is not None:
        # Exits after the action other than the one it caused (crash: the action itself; hang:
        # the kill that follows it): a new process died, which should not happen.
        exits = [
            ev
            for ev in events
            if ev["instance"] == sick
            and ev["kind"] == "instance.state"
            and ev.get("to") in ("backoff", "fatal", "exited")
            and ev["at"] >= act["at"]
        ]
        expected = 1 if fault in ("crash", "hang") else 0
        out["unexpected_exits_after_action"] = [brief(ev, t_inject) for ev in exits[expected:]]
        ready = first_event(events, sick, ("instance.state",), act["at"], ("ready",))
        spawned = first_event(events, sick, ("instance.spawned",), act["at"])
        if spawned is not None:
            out["new_process_after_s"] = round(spawned["at"] - t_inject, 3)
        if ready is not None:
            out["ready_again_after_s"] = round(ready["at"] - t_inject, 3)
            # Requests sent in the last 5 ms before it was ready reach the daemon after it.
            out_recs = [r for r in recs if act["at"] <= r[0] < ready["at"] - 0.005]
            out["share_while_out"] = share(out_recs, sick)
            out["requests_while_out"] = len(out_recs)
            # Send times (s after the injection) of any that still ended on it: diagnostics.
            out["sick_served_while_out_at"] = [
                round(r[0] - t_inject, 4) for r in out_recs if r[1] == sick
            ][:10]
    if fault.startswith("slow"):
        out.update(slow_figures(recs, events, sick, t_inject, t_end))
    if fault.startswith("leak"):
        out.update(leak_figures(mon.rss, events, sick, sick_pid, t_inject))
    # Policy events on the healthy instances are false positives; on the sick one, the story.
    out["sick_events"] = [
        brief(ev, t_inject)
        for ev in events
        if ev["instance"] == sick
        and ev["at"] >= t_inject
        and (ev["kind"] in POLICY_KINDS or ev["kind"] in ("instance.state", "instance.spawned"))
    ][:40]
    out["other_instances_policy_events"] = [
        brief(ev, t_inject)
        for ev in events
        if ev["instance"] not in (None, sick) and ev["kind"] in POLICY_KINDS
    ]
    if snap_inject and mon.snaps:
        out["daemon_counters_sick"] = counters_delta(snap_inject, mon.snaps[-1][1], sick)
    out["client_trouble"] = (load.errors + mon.errors)[:5]
    return out


def share(recs: list[tuple[float, str | None, bool, int, str]], sick: str) -> float | None:
    """The sick instance's share of the requests that ended on some instance."""
    served = [r for r in recs if r[1] is not None]
    if not served:
        return None
    return round(sum(1 for r in served if r[1] == sick) / len(served), 4)


def attempts_until(
    s0: dict[str, dict[str, Any]],
    snaps: list[tuple[float, dict[str, dict[str, Any]]]],
    inst: str,
    t1: float,
) -> int | None:
    """Attempts the daemon counted on `inst` (finished + in flight) from the injection's
    snapshot to the first polled one after `t1` (≤ 0.1 s late; every action stops or nearly
    stops the sick instance's traffic, so the lag adds little)."""

    def count(s: dict[str, dict[str, Any]]) -> int:
        r = s[inst]["requests"]
        return int(r["requests"] + r["in_flight"])

    later = [s for t, s in snaps if t >= t1 and inst in s]
    if inst not in s0 or not later:
        return None
    return count(later[0]) - count(s0)


def counters_delta(
    s0: dict[str, dict[str, Any]], s1: dict[str, dict[str, Any]], inst: str
) -> dict[str, int] | None:
    if inst not in s0 or inst not in s1:
        return None
    r0, r1 = s0[inst]["requests"], s1[inst]["requests"]
    return {k: r1[k] - r0[k] for k in ("requests", "ok", "errors", "timeouts", "lost")}


def brief(ev: dict[str, Any], t0: float) -> dict[str, Any]:
    out = {"t": round(ev["at"] - t0, 3), "instance": ev["instance"], "kind": ev["kind"]}
    if ev.get("to"):
        out["to"] = ev["to"]
    out["reason"] = ev["reason"][:160]
    return out


def slow_figures(
    recs: list[tuple[float, str | None, bool, int, str]],
    events: list[dict[str, Any]],
    sick: str,
    t_inject: float,
    t_end: float,
) -> dict[str, Any]:
    late = [r for r in recs if r[0] >= t_inject + TARGET_SLOW_WITHIN_S]
    timeline = []
    t = t_inject
    while t < t_end - 0.5:
        timeline.append(share([r for r in recs if t <= r[0] < t + 1.0], sick))
        t += 1.0
    weights = [
        {"t": round(ev["at"] - t_inject, 3), "kind": ev["kind"], "to": ev["data"].get("to")}
        for ev in events
        if ev["instance"] == sick
        and ev["kind"] in ("instance.downweighted", "instance.weight_restored")
        and ev["at"] >= t_inject
    ]
    return {
        "share_from_5s": share(late, sick),
        "requests_from_5s": len(late),
        "share_per_second": timeline,
        "weight_changes": weights,
    }


def leak_figures(
    rss: list[tuple[float, int, int]],
    events: list[dict[str, Any]],
    sick: str,
    pid: int,
    t_inject: float,
) -> dict[str, Any]:
    own = [(t, b) for t, p, b in rss if p == pid]
    peak = max((b for _, b in own), default=None)
    drain = first_event(events, sick, ("instance.draining",), t_inject)
    out: dict[str, Any] = {
        "max_rss_mib": MAX_RSS / 2**20,
        "peak_rss_seen_mib": None if peak is None else round(peak / 2**20, 1),
        "rss_at_injection_mib": next((round(b / 2**20, 1) for t, b in own if t >= t_inject), None),
        "rss_samples": len(own),
    }
    if drain is not None:
        figure = drain["data"].get("rss_bytes")
        out["rss_in_action_event_mib"] = None if figure is None else round(figure / 2**20, 1)
        if figure is not None:  # the daemon's sample may be later than our last one
            peak = max(peak or 0, figure)
            out["peak_rss_seen_mib"] = round(peak / 2**20, 1)
    out["below_2x_max_rss"] = peak is not None and peak < 2 * MAX_RSS
    return out


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases, lower rate")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default 250)")
    parser.add_argument("--strategy", default=None, help="daemon default_strategy")
    parser.add_argument(
        "--faults",
        default=None,
        help="comma-separated subset of: " + ", ".join(ACTION),
    )
    args = parser.parse_args()
    # 250/s: the slow instance (20 ms a request, one at a time) could take 50/s = 20 % of it,
    # so its share is up to the policy, not capped by its own capacity (at 500/s it would be).
    args.rate = args.rate or 250.0
    if not 1 <= args.rate <= 5000:
        parser.error("--rate must be from 1 to 5000")
    args.warmup = 1.0 if args.quick else 1.5  # ≥ slow.min_requests per instance before the fault
    args.after = 1.0 if args.quick else 2.0  # seconds of load kept after the action
    args.slow_after = 7.0 if args.quick else 9.0  # slow: phase length after the injection
    args.phase_max = 10.0 if args.quick else 15.0  # give up waiting for an action
    args.min_requests = 1000  # requests after the injection, at least (0.1 % resolution)
    faults = list(ACTION)
    if args.quick:
        faults.remove("slow_policy_off")
    if args.faults:
        faults = [f.strip() for f in args.faults.split(",") if f.strip()]
        unknown = [f for f in faults if f not in ACTION]
        if unknown:
            parser.error(f"unknown fault(s) {', '.join(unknown)} (known: {', '.join(ACTION)})")

    daemon_cfg = dict(DAEMON_CONFIG)
    if args.strategy:
        daemon_cfg["default_strategy"] = args.strategy
    result: dict[str, Any] = {
        "benchmark": "faults",
        "machine": machine_info(),
        "source": source_state(),
    }
    t_start = time.perf_counter()
    home = tempfile.mkdtemp(prefix="efault", dir="/tmp")
    Path(home, "config.toml").write_text(
        "[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in daemon_cfg.items())
    )
    os.environ["ENGCTL_HOME"] = home
    c = Client(home)
    daemon_pid: int | None = None
    worker_pids: set[int] = set()
    phases: dict[str, Any] = {}
    try:
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        specs = {f: engine_spec(POLICY) for f in faults}
        if "leak_over_max_rss" in specs:
            specs["leak_over_max_rss"] = engine_spec(
                {**POLICY, "memory": {**POLICY["memory"], "leak_rate": 0}}
            )
        if "slow_policy_off" in specs:
            specs["slow_policy_off"] = engine_spec({**POLICY, "slow": {"enabled": False}})
        for fault in faults:
            phases[fault] = run_phase(c, home, fault, specs[fault], args, worker_pids)
            print(f"{fault}: done", file=sys.stderr)
        c.register({"f-policy": engine_spec(POLICY)}, start=False)
        effective = c.call("policy.show", names=["f-policy"])["engines"][0]
        c.unregister(["f-policy"])
    finally:
        stop_daemon(c, home, daemon_pid, worker_pids)

    result["settings"] = {
        "quick": args.quick,
        "daemon_config": daemon_cfg,
        "engine": {k: v for k, v in engine_spec(POLICY).items() if k != "command"},
        "phase_overrides": {
            "leak_over_max_rss": {"memory": {"leak_rate": 0}},
            "slow_policy_off": {"slow": {"enabled": False}},
        },
        "effective_policy": effective["policy"],
        "health": effective["health"],
        "restart": effective["restart"],
        "load": {
            "rate_per_s": args.rate,
            "client_threads": THREADS,
            "timeout_s": TIMEOUT,
            "retries": RETRIES,
            "warmup_s": args.warmup,
            "kept_after_action_s": args.after,
            "slow_phase_after_injection_s": args.slow_after,
            "max_wait_for_action_s": args.phase_max,
            "min_requests_after_injection": args.min_requests,
        },
        "worker": {"base_ms": BASE_MS, "slow_factor": 10, "leak_mib_per_s": LEAK_MIB_S},
        "sick_instance_index": SICK,
    }
    result["faults"] = phases
    result["targets"] = targets(phases)
    if "slow" in phases and "slow_policy_off" in phases:
        base = phases["slow_policy_off"].get("share_from_5s")
        result["slow_target_context"] = {
            "share_from_5s_with_policy": phases["slow"].get("share_from_5s"),
            "share_from_5s_without_policy": base,
            # Whether the target tests the policy at all: without it the share must exceed 10 %.
            "target_discriminates": base is not None and base > TARGET_SLOW_SHARE,
        }
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))


def targets(phases: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fault in ("crash", "failing", "slow"):
        if fault in phases:
            rate = phases[fault]["success_rate"]
            out[f"{fault}_success_ge_99_9pct"] = rate is not None and rate >= TARGET_SUCCESS
    if "slow" in phases:
        s = phases["slow"].get("share_from_5s")
        out["slow_share_le_10pct_within_5s"] = s is not None and s <= TARGET_SLOW_SHARE
    for fault in ("leak", "leak_over_max_rss"):
        if fault in phases:
            p = phases[fault]
            restarted = p["acted"] and "new_process_after_s" in p
            out[f"{fault}_restarted_below_2x_max_rss"] = restarted and p["below_2x_max_rss"]
    for fault, p in phases.items():
        if fault != "slow_policy_off":
            out.setdefault("policy_acted", {})[fault] = p["acted"]
    return out


def stop_daemon(c: Client, home: str, daemon_pid: int | None, worker_pids: set[int]) -> None:
    """Stop the daemon (never autostarting one to do so), then make sure nothing is left."""
    c.close()
    stop_home_daemon(home, daemon_pid)
    # Every worker this run saw must be gone with the daemon; a survivor is reported (stderr)
    # and killed: it is one of ours (this script's worker, started by this run's daemon).
    for pid in sorted(worker_pids):
        try:
            proc = psutil.Process(pid)
            if WORKER in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                print(f"cleanup: worker pid {pid} outlived the daemon: killed", file=sys.stderr)
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
