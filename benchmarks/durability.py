"""Durability under kill -9 of the daemon (issue 9): prints one JSON object with the figures.

Run: `python benchmarks/durability.py [--quick] [--rounds N] [--clients K]`.

One temporary ENGCTL_HOME, N rounds (default 50; 5 with --quick). Each round:
1. A client starts a daemon (the one killed in the round before leaves its engines running:
   the new daemon must stop them and start the registered instances, once each).
2. Checks, against what earlier rounds' clients were told: every acknowledged registration is
   registered, every acknowledged unregistration is gone (a call the kill cut off before its
   answer may have gone either way: counted apart); then, once the fleet settles (at most
   20 s), the processes carrying this home's ENGCTL_DAEMON_ID marker: per wanted instance
   exactly one (`duplicate_instances` counts the extra ones, `missing_instances` the absent),
   none of an instance not wanted or not a child of the new daemon (`orphans`).
3. Load: K client threads (default 4) register new engines (a service, `sleep`, 1 instance)
   one after the other, and after each unregister one of their earlier ones half of the time,
   and as many as they hold beyond 6 (in one call; each thread takes over a share of the
   engines left by earlier rounds, so the fleet stays bounded); one thread sends `exec`
   requests to a 2-instance echo worker all along (the exec load).
4. After a random 0.05-0.8 s (uniform, seeded) a killer sends SIGKILL to the daemon; the
   clients see the connection drop and stop. Both SQLite files (events, history) are then
   opened as the next daemon would and must pass `PRAGMA integrity_check`.

Pass: no acknowledged registration lost, no acknowledged unregistration undone, no duplicate,
no orphan, every integrity check "ok". At the end the daemon is stopped and the home removed
(also on error or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import exit_cleanly_on_sigterm, machine_info, source_state, stop_daemon, wait_for

from engctl.client import Client
from engctl.errors import EngctlError

PY = sys.executable
WORKER = str(Path(__file__).with_name("faulty_worker.py"))
SETTLE_S = 20.0
HELD = 6  # engines a registering thread keeps at most
DAEMON_ID_ENV = "ENGCTL_DAEMON_ID"
INSTANCE_ENV = "ENGCTL_INSTANCE"

SERVICE = {"command": ["sleep", "3600"], "mode": "service", "restart": {"start_seconds": 0.1}}
ECHO = {
    "command": [PY, WORKER],
    "mode": "worker",
    "instances": 2,
    "type": "echo",
    "env": {"FAULTY_BASE_MS": "0"},
    "restart": {"start_seconds": 0.1},
}


class Ledger:
    """What the clients were told, across rounds (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registered: set[str] = set()  # acknowledged, not unregistered since
        self.unregistered: set[str] = set()  # acknowledged unregistrations
        self.uncertain: set[str] = set()  # a call cut off by the kill: either outcome is fine
        self.acked_registrations = 0
        self.acked_unregistrations = 0
        self.exec_ok = 0
        self.exec_failed = 0


def register_loop(
    home: str, k: int, rnd: int, ledger: Ledger, rng: random.Random, mine: list[str]
) -> None:
    n = 0
    with Client(home, autostart=False, timeout=30) as c:
        while True:
            name = f"r{rnd}c{k}n{n}"
            n += 1
            try:
                c.register({name: SERVICE})
            except EngctlError:
                with ledger.lock:
                    ledger.uncertain.add(name)
                return
            with ledger.lock:
                ledger.registered.add(name)
                ledger.acked_registrations += 1
            mine.append(name)
            drop = max(len(mine) - HELD, 1 if len(mine) > 1 and rng.random() < 0.5 else 0)
            if drop:
                gone = rng.sample(mine[:-1], drop)  # never the one just registered
                mine[:] = [n for n in mine if n not in gone]
                try:
                    c.unregister(gone)
                except EngctlError:
                    with ledger.lock:
                        ledger.registered.difference_update(gone)
                        ledger.uncertain.update(gone)
                    return
                with ledger.lock:
                    ledger.registered.difference_update(gone)
                    ledger.unregistered.update(gone)
                    ledger.acked_unregistrations += len(gone)


def exec_loop(home: str, ledger: Ledger) -> None:
    with Client(home, autostart=False, timeout=30) as c:
        i = 0
        while True:
            i += 1
            try:
                c.exec(i, type="echo", timeout=2.0)
            except EngctlError as exc:
                if exc.exit_code == 3:  # the daemon is gone
                    return
                with ledger.lock:
                    ledger.exec_failed += 1
                continue
            with ledger.lock:
                ledger.exec_ok += 1


def marker_processes(state_dir: str) -> list[tuple[int, int, str]]:
    """(pid, parent pid, instance id) of the live processes marked for this home."""
    out = []
    for p in psutil.process_iter(["pid", "ppid"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            env = p.environ()
        except psutil.Error:
            continue
        if env.get(DAEMON_ID_ENV) == state_dir:
            out.append((p.pid, p.info["ppid"], env.get(INSTANCE_ENV, "")))
    return out


def fleet_check(c: Client, state_dir: str, daemon_pid: int) -> dict[str, Any]:
    """Wait for the fleet to settle; then duplicates, missing instances and orphans."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        st = c.status()
        wanted = {
            i["id"]
            for e in st["engines"]
            if e["desired"] == "running" and e["mode"] != "oneshot"
            for i in e["instances"]
        }
        states = {i["id"]: i["state"] for e in st["engines"] for i in e["instances"]}
        ready = all(states.get(i) == "ready" for i in wanted)
        procs = marker_processes(state_dir)
        by_id: dict[str, int] = {}
        for _, _, inst in procs:
            by_id[inst] = by_id.get(inst, 0) + 1
        orphans = sum(1 for _, ppid, inst in procs if inst not in wanted or ppid != daemon_pid)
        duplicates = sum(n - 1 for inst, n in by_id.items() if inst in wanted and n > 1)
        missing = sum(1 for inst in wanted if inst not in by_id)
        settled = ready and not orphans and not duplicates and not missing
        if settled or time.monotonic() > deadline:
            return {
                "wanted": len(wanted),
                "processes": len(procs),
                "duplicates": duplicates,
                "orphans": orphans,
                "missing": missing,
                "settled": settled,
            }
        time.sleep(0.1)


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of a database as the next daemon opens it (WAL recovered)."""
    if not path.exists():
        return "missing"
    try:
        conn = sqlite3.connect(path, timeout=10)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"error: {exc}"


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_round(
    home: str, rnd: int, args: argparse.Namespace, ledger: Ledger, rng: random.Random
) -> dict[str, Any]:
    state_dir = str(Path(home, "state"))
    t0 = time.perf_counter()
    c = Client(home, timeout=60)
    c.connect()
    daemon_pid = int(c.daemon_info["pid"])
    started_s = time.perf_counter() - t0
    if rnd == 0:
        c.register({"echo": ECHO})
    names = {e["name"] for e in c.call("engine.list")["engines"]}
    with ledger.lock:
        lost = sorted(ledger.registered - names)
        undone = sorted(ledger.unregistered & names)
        # Settle what the kill cut off: it is now whatever the new daemon has.
        for name in ledger.uncertain:
            if name in names:
                ledger.registered.add(name)
            else:
                ledger.registered.discard(name)
        uncertain = len(ledger.uncertain)
        ledger.uncertain.clear()
        ledger.unregistered -= names
    fleet = fleet_check(c, state_dir, daemon_pid)
    c.close()

    with ledger.lock:
        left = sorted(ledger.registered)
    threads = [
        threading.Thread(
            target=register_loop,
            args=(home, k, rnd, ledger, random.Random(rng.random()), left[k :: args.clients]),
        )
        for k in range(args.clients)
    ]
    threads.append(threading.Thread(target=exec_loop, args=(home, ledger)))
    for t in threads:
        t.start()
    delay = rng.uniform(0.05, 0.8)
    time.sleep(delay)
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: dead(daemon_pid), 30)
    for t in threads:
        t.join(60)
    checks = {
        "events": integrity(Path(state_dir, "events.sqlite3")),
        "history": integrity(Path(state_dir, "history.sqlite3")),
    }
    return {
        "round": rnd,
        "start_s": round(started_s, 3),
        "lost": lost,
        "undone": undone,
        "uncertain": uncertain,
        "fleet": fleet,
        "kill_after_s": round(delay, 3),
        "integrity": checks,
    }


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="kills (default 50)")
    parser.add_argument("--clients", type=int, default=4, help="registering threads")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 50)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {
        "benchmark": "durability",
        "machine": machine_info(),
        "source": source_state(),
        "settings": {"rounds": rounds, "clients": args.clients, "seed": args.seed},
    }
    home = tempfile.mkdtemp(prefix="edur", dir="/tmp")
    os.environ["ENGCTL_HOME"] = home
    ledger = Ledger()
    per_round: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        for rnd in range(rounds):
            per_round.append(run_round(home, rnd, args, ledger, rng))
        # The last kill is checked by one more start.
        c = Client(home, timeout=60)
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        names = {e["name"] for e in c.call("engine.list")["engines"]}
        final = {
            "lost": sorted(ledger.registered - names),
            "undone": sorted(ledger.unregistered & names),
            "fleet": fleet_check(c, str(Path(home, "state")), daemon_pid),
        }
        c.close()
    finally:
        pid_file = Path(home, "state", "daemon.pid")
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        stop_daemon(home, int(pid) if pid.isdigit() else None)
        for p, _, _ in marker_processes(str(Path(home, "state"))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)

    checks = [r["integrity"] for r in per_round]
    fleets = [r["fleet"] for r in per_round[1:]] + [final["fleet"]]
    lost = sum(len(r["lost"]) for r in per_round[1:]) + len(final["lost"])
    undone = sum(len(r["undone"]) for r in per_round[1:]) + len(final["undone"])
    figures = {
        "kills": rounds,
        "registrations_acknowledged": ledger.acked_registrations,
        "unregistrations_acknowledged": ledger.acked_unregistrations,
        "acknowledged_registrations_lost": lost,
        "acknowledged_unregistrations_undone": undone,
        "calls_cut_off_by_a_kill": sum(r["uncertain"] for r in per_round[1:]),
        "duplicate_instances": sum(f["duplicates"] for f in fleets),
        "orphans": sum(f["orphans"] for f in fleets),
        "missing_instances": sum(f["missing"] for f in fleets),
        "rounds_not_settled": sum(1 for f in fleets if not f["settled"]),
        "instances_wanted_max": max(f["wanted"] for f in fleets),
        "integrity_checks": 2 * len(checks),
        "integrity_failures": [
            {"round": r["round"], **r["integrity"]}
            for r in per_round
            if set(r["integrity"].values()) != {"ok"}
        ],
        "exec_requests_ok": ledger.exec_ok,
        "exec_requests_failed_not_by_a_kill": ledger.exec_failed,
        "daemon_start_s": {
            "median": round(statistics.median(r["start_s"] for r in per_round), 3),
            "max": max(r["start_s"] for r in per_round),
        },
    }
    figures["pass"] = (
        lost == 0
        and undone == 0
        and figures["duplicate_instances"] == 0
        and figures["orphans"] == 0
        and not figures["integrity_failures"]
    )
    result["figures"] = figures
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if figures["pass"] else 1)


if __name__ == "__main__":
    main()
