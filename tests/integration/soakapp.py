"""Task app of the reliability tests, ``scripts/soak.py`` and ``scripts/bench/overhead.py``.

``SOAK_MODE`` picks what a ``-A soakapp`` worker runs:

- ``rmq`` (default): the reference app (``workers.app.make_app``) with governed ``soak.*`` tasks that
  record every run in Redis (:func:`record_start`, :func:`record_done`), so a test sees re-runs.
- ``user-rmq`` / ``user-plain``: the overhead bench as users compare (``--compare install``): an app
  with a broker, a backend and ``SOAK_PREFETCH`` and nothing else (:func:`user_app`); ``user-rmq``
  adds ``rmq.install(app)`` and ``@governed_task()`` (no declaration), ``user-plain`` has ``@app.task``,
  ``user-installed`` has ``rmq.install(app)`` with ``@app.task`` (what install() costs alone).
  ``python -c 'import soakapp; soakapp.fill_main()'`` sends tasks from such an app, as its users do.
- ``bench-rmq`` / ``bench-plain``: the overhead bench of the governed task path. The same Celery settings for both
  (:func:`bench_conf`: prefork, acks_late, reject on worker lost, prefetch ``SOAK_PREFETCH``, the
  broker transport options rmq sets, no events, no started state); ``bench-rmq`` adds
  ``rmq.install(app)`` and governed ``ovh.*`` tasks that declare their memory, ``bench-plain`` has
  the same functions as plain ``app.task``s.

Markers (Redis of ``RMQ_BROKER_URL``, or ``SOAK_MARK_URL``): ``soak:starts:<id>`` is a list of
``"<time>|<pid>|<redelivered 0/1>|<hostname>|<deferrals>"`` per run; ``soak:done:<id>`` lists
``"<time>|<pid>"`` of each run whose body finished.

Test-only switches (environment of the worker):

- ``SOAK_CPROFILE=<dir>``: each pool process writes a CPU-time cProfile to ``<dir>`` when it exits;
  the bench-rmq task ``ovh.profile_guards`` profiles the guard chain inside a pool process.
- ``SOAK_CPROFILE_MAIN=<dir>``: the worker's main thread writes a CPU-time cProfile to ``<dir>`` at shutdown.
- ``SOAK_IMPORT=<module>``: a module imported into the worker, e.g. ``pathtiming`` (CPU and wall time of
  each part of the governed path, per pool process).
- ``SOAK_POOL_NICE=<n>``: each pool process lowers its scheduling priority by ``n`` when it starts
  (``os.nice``), so that the worker's main process runs first when both want a core (an experiment:
  neither Celery nor rmq does this).
- ``SOAK_TASK_OPTS`` / ``SOAK_USER_CONF`` (JSON, ``user-*`` modes): task options / Celery settings added
  (``overhead.py --variant`` uses the second).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis as redis_lib

MiB = 1 << 20
MODE = os.environ.get("SOAK_MODE", "rmq")
BROKER = os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/0")
MARK_URL = os.environ.get("SOAK_MARK_URL") or (BROKER if BROKER.startswith("redis") else
                                               os.environ.get("RMQ_RESULT_BACKEND", BROKER))
MARK_TTL_S = 3600
_HOST = socket.gethostname()


def bench_conf(prefetch: int = 1) -> dict[str, Any]:
    """Celery settings shared by both overhead-bench apps (and their clients)."""
    return {
        "worker_prefetch_multiplier": prefetch,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_track_started": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def rmq_transport_conf(broker: str) -> dict[str, Any]:
    """The broker settings ``rmq.install`` gives an app on ``broker`` (for the plain app too)."""
    from celery import Celery

    import rmq

    probe = Celery("probe", broker=broker, set_as_current=False)
    rmq.install(probe)
    conf = probe.conf
    out = {
        "broker_transport_options": dict(conf.broker_transport_options or {}),
        "task_queue_max_priority": conf.task_queue_max_priority,
        "task_default_priority": conf.task_default_priority,
    }
    probe.close()
    return out


def bench_app(governed: bool, broker: str, backend: str | None = None, prefetch: int = 1,
              transport: dict[str, Any] | None = None) -> Any:
    """A Celery app of the overhead bench: identical settings, with or without rmq.

    The plain app gets ``transport`` (default: :func:`rmq_transport_conf`), the broker settings
    rmq would give it, so that both apps use the same Redis key layout and restore options.
    """
    from celery import Celery

    app = Celery("overhead", broker=broker, backend=backend or broker, set_as_current=False)
    app.conf.update(bench_conf(prefetch))
    if governed:
        import rmq

        rmq.install(app)
    else:
        app.conf.update(transport if transport is not None else rmq_transport_conf(broker))
    return app


def user_app(governed: bool, broker: str, backend: str | None = None, prefetch: int = 4) -> Any:
    """An app as a user writes it: a broker, a backend and the prefetch multiplier, with or without
    ``rmq.install(app)``. Nothing else is given to either side (what ``install()`` changes counts).

    ``worker_hijack_root_logger`` and ``broker_connection_retry_on_startup`` only keep the bench's
    logs quiet; they change nothing on the task path.
    """
    from celery import Celery

    app = Celery("overhead", broker=broker, backend=backend or broker, set_as_current=False)
    app.conf.update(worker_prefetch_multiplier=prefetch, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)
    if os.environ.get("SOAK_USER_CONF"):  # a profiling aid (JSON): the bench itself gives nothing more
        import json

        app.conf.update(json.loads(os.environ["SOAK_USER_CONF"]))
    if governed:
        import rmq

        rmq.install(app)
    return app


def fill_main() -> None:
    """Send ``SOAK_FILL_N`` tasks ``SOAK_FILL_TASK`` (args ``SOAK_FILL_ARGS``, JSON) with ids
    ``<SOAK_FILL_PREFIX>-<i>``, through the task's own ``apply_async`` (router, priorities), one producer."""
    import json

    n = int(os.environ["SOAK_FILL_N"])
    prefix = os.environ["SOAK_FILL_PREFIX"]
    args = tuple(json.loads(os.environ.get("SOAK_FILL_ARGS", "[]")))
    task = app.tasks[os.environ["SOAK_FILL_TASK"]]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async(args, task_id=f"{prefix}-{i}", producer=producer)


_redis: redis_lib.Redis | None = None
_redis_pid = -1


def _client() -> redis_lib.Redis:
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis, _redis_pid = redis_lib.Redis.from_url(MARK_URL), os.getpid()
    return _redis


def record_start(request: Any) -> float:
    """Append this run to ``soak:starts:<id>``: ``time|pid|redelivered 0/1|hostname|deferrals``."""
    now = time.time()
    redelivered = 1 if (getattr(request, "delivery_info", None) or {}).get("redelivered") else 0
    deferrals = int(getattr(request, "rmq_deferrals", 0) or (getattr(request, "headers", None) or {}).get(
        "rmq_deferrals", 0) or 0)
    key = f"soak:starts:{request.id}"
    pipe = _client().pipeline(transaction=False)
    pipe.rpush(key, f"{now:.6f}|{os.getpid()}|{redelivered}|{getattr(request, 'hostname', '') or _HOST}|"
                    f"{deferrals}")
    pipe.expire(key, MARK_TTL_S)
    pipe.execute()
    return now


def record_done(request: Any) -> None:
    """Append a finished body to ``soak:done:<id>``: ``time|pid``."""
    key = f"soak:done:{request.id}"
    pipe = _client().pipeline(transaction=False)
    pipe.rpush(key, f"{time.time():.6f}|{os.getpid()}")
    pipe.expire(key, MARK_TTL_S)
    pipe.execute()


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


if MODE == "rmq":
    from rmq import governed_task
    from rmq.celery.task import rmq_headers
    from rmq.core.errors import Defer
    from workers.app import make_app

    app = make_app()
    app.set_current()

    @governed_task(memory="32MiB", name="soak.noop", bind=True)
    def noop(self: Any) -> str:
        """Does nothing but record its run."""
        record_start(self.request)
        record_done(self.request)
        return "ok"

    @governed_task(memory="32MiB", name="soak.sleep", bind=True)
    def sleep(self: Any, seconds: float) -> dict:
        """Sleeps ``seconds``."""
        started = record_start(self.request)
        time.sleep(seconds)
        record_done(self.request)
        return {"pid": os.getpid(), "started": started, "ended": time.time()}

    @governed_task(memory="64MiB", name="soak.alloc", bind=True)
    def alloc(self: Any, mib: int) -> int:
        """Touches ``mib`` MiB, then lets it go."""
        record_start(self.request)
        block = _touch(mib * MiB)
        n = len(block)
        del block
        record_done(self.request)
        return n

    @governed_task(memory="32MiB", name="soak.defer_once", bind=True)
    def defer_once(self: Any, countdown_s: float = 0.3) -> str:
        """Defers itself once (a Defer from the body), then succeeds."""
        record_start(self.request)
        if int(rmq_headers(self.request).get("rmq_deferrals", 0) or 0) < 1:
            raise Defer("soak: defer once", countdown_s, kind="soak")
        record_done(self.request)
        return "deferred once"

    @governed_task(memory="32MiB", name="soak.defer_then_die", bind=True)
    def defer_then_die(self: Any, countdown_s: float = 0.3) -> str:
        """Defers itself once and then dies before its worker acknowledges the message: the worst
        moment for a deferral (the deferred copy is already sent, the original is redelivered)."""
        from celery.exceptions import Retry

        record_start(self.request)
        if int(rmq_headers(self.request).get("rmq_deferrals", 0) or 0) < 1 and not self.request.delivery_info.get(
                "redelivered"):
            try:
                self._defer(Defer("soak: defer then die", countdown_s, kind="soak"))
            except Retry:
                os.kill(os.getpid(), 9)
        record_done(self.request)
        return "done"

elif MODE in ("user-rmq", "user-plain", "user-installed"):
    import json

    # SOAK_TASK_OPTS (JSON), a profiling aid: the bench itself gives no option to either side
    task_opts = json.loads(os.environ.get("SOAK_TASK_OPTS") or "{}")
    app = user_app(MODE != "user-plain", BROKER, os.environ.get("RMQ_RESULT_BACKEND", BROKER),
                   int(os.environ.get("SOAK_PREFETCH", "4")))
    app.set_current()
    if MODE == "user-rmq":
        from rmq import governed_task

        user_task = governed_task(**task_opts)
    else:
        user_task = app.task(**task_opts)

    @user_task
    def noop() -> None:
        """No work at all."""
        return None

    @user_task
    def cpu(ms: float = 5.0) -> None:
        """``ms`` milliseconds of CPU work (a busy loop)."""
        _spin(ms / 1000.0)

elif MODE in ("bench-rmq", "bench-plain"):
    import json

    prefetch = int(os.environ.get("SOAK_PREFETCH", "1"))
    transport = json.loads(os.environ["SOAK_TRANSPORT"]) if os.environ.get("SOAK_TRANSPORT") else None
    app = bench_app(MODE == "bench-rmq", BROKER, os.environ.get("RMQ_RESULT_BACKEND", BROKER), prefetch,
                    transport)
    app.set_current()
    if MODE == "bench-rmq":
        from rmq import governed_task

        def task(**options: Any) -> Any:
            return governed_task(memory="16MiB", **options)
    else:
        task = app.task

    @task(name="ovh.noop")
    def ovh_noop() -> None:
        """No work at all."""
        return None

    @task(name="ovh.cpu")
    def ovh_cpu(ms: float = 5.0) -> None:
        """``ms`` milliseconds of CPU work (a busy loop)."""
        _spin(ms / 1000.0)

    if MODE == "bench-rmq":

        @governed_task(memory="16MiB", name="ovh.profile_guards")
        def ovh_profile_guards(n: int = 2000) -> str:
            """Profiling aid: run this worker's guard chain ``n`` times for a no-op, in this pool
            process, under cProfile (CPU time); returns the top of the profile."""
            import cProfile
            import io
            import pstats

            from celery import Task

            from rmq.celery.concerns import default_concerns
            from rmq.concern import TaskContext
            from rmq.core.declarations import parse_declaration
            from rmq.core.runtime import current

            rt = current()
            decl = parse_declaration(memory="16MiB")
            guards = [g for g in default_concerns() if g.applies(decl)]
            def chain(prefix: str, chosen: list[Any]) -> float:
                """Run ``chosen`` guards around ``n`` no-ops; CPU microseconds per task."""
                t0 = time.thread_time()
                for i in range(n):
                    ctx = TaskContext(task_name="ovh.noop", task_id=f"{prefix}-{i}", declaration=decl,
                                      config=rt.config)
                    for g in chosen:
                        g.enter(ctx)
                    for g in reversed(chosen):
                        g.exit(ctx, False)
                return (time.thread_time() - t0) / n * 1e6

            plain_us = chain("p", guards)
            per_guard = {g.name: round(chain(f"g{k}", [g]), 1) for k, g in enumerate(guards)}  # each alone
            per_guard["context"] = round(chain("c", []), 1)
            call_us = {}
            noop = app.tasks["ovh.noop"]
            for label, call in (("governed", type(noop).__call__), ("celery", Task.__call__)):
                t0 = time.thread_time()
                for i in range(n):  # what the pool process runs around the body, minus Celery's tracer
                    noop.push_request(id=f"c-{label}-{i}", delivery_info={"redelivered": False},
                                      hostname="profile@x", called_directly=False, is_eager=False)
                    try:
                        call(noop)
                    finally:
                        noop.pop_request()
                call_us[label] = (time.thread_time() - t0) / n * 1e6
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            chain("q", guards)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            return (f"guard chain: {plain_us:.1f} us CPU per task without the profiler (by guard: {per_guard}); "
                    f"a no-op's __call__: governed {call_us['governed']:.1f} us, Celery's {call_us['celery']:.1f} us\n"
                    + out.getvalue())

    @task(name="ovh.sleep")
    def ovh_sleep(ms: float = 5.0) -> None:
        """``ms`` milliseconds of waiting (I/O-like)."""
        time.sleep(ms / 1000.0)

else:  # pragma: no cover
    raise RuntimeError(f"unknown SOAK_MODE {MODE!r}")


if os.environ.get("SOAK_CPROFILE"):  # profiling aid: CPU-time cProfile of each pool process
    import cProfile

    from celery import signals as _signals

    _prof: dict[str, Any] = {}

    @_signals.worker_process_init.connect(weak=False)
    def _prof_start(**_: Any) -> None:
        _prof["p"] = cProfile.Profile(time.process_time)
        _prof["p"].enable()

    @_signals.worker_process_shutdown.connect(weak=False)
    def _prof_stop(**_: Any) -> None:
        p = _prof.get("p")
        if p is not None:
            p.disable()
            p.dump_stats(os.path.join(os.environ["SOAK_CPROFILE"], f"pool-{os.getpid()}.prof"))


if os.environ.get("SOAK_CPROFILE_MAIN"):  # profiling aid: CPU-time cProfile of the worker's main thread
    import cProfile

    from celery import signals as _msignals

    _mprof: dict[str, Any] = {}

    @_msignals.worker_ready.connect(weak=False)
    def _mprof_start(**_: Any) -> None:
        _mprof["p"] = cProfile.Profile(time.thread_time)
        _mprof["p"].enable()

    @_msignals.worker_shutdown.connect(weak=False)
    def _mprof_stop(**_: Any) -> None:
        p = _mprof.get("p")
        if p is not None:
            p.disable()
            p.dump_stats(os.path.join(os.environ["SOAK_CPROFILE_MAIN"], f"main-{os.getpid()}.prof"))


if os.environ.get("SOAK_POOL_NICE"):  # an experiment: the main process before the pool (see above)
    from celery import signals as _nsignals

    @_nsignals.worker_process_init.connect(weak=False)
    def _pool_nice(**_: Any) -> None:
        os.nice(int(os.environ["SOAK_POOL_NICE"]))


if os.environ.get("SOAK_IMPORT"):  # profiling aid: a module to import into the worker (instrumentation)
    import importlib

    importlib.import_module(os.environ["SOAK_IMPORT"])
