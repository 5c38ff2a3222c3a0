"""The ``rmq`` command: worker profiles, Flower with rmq's pages, doctor, status, cleanup, the cluster
exporter, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rmq.core.errors import ConfigError
from rmq.core.exits import exit_with_line
from rmq.memory.scaling import parse_autoscale

__all__ = ["main", "profile_argv"]

PROFILES = ("heavy", "light", "all")


def _app_name(name: str | None) -> str:
    """``-A``, else ``RMQ_APP``: the library has no app of its own to fall back on."""
    name = name or os.environ.get("RMQ_APP")
    if not name:
        exit_with_line("which Celery app? give -A APP (as for celery) or set RMQ_APP")
    return name


def _load_app(name: str | None) -> Any:
    name = _app_name(name)
    sys.path.insert(0, os.getcwd())
    from celery.app.utils import find_app

    try:
        return find_app(name)
    except Exception as exc:  # an import error in the user's module
        exit_with_line(f"cannot load the Celery app {name!r}: {exc}")


def _has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") or (len(f) == 2 and a.startswith(f) and len(a) > 2)
               for a in args for f in flags)


def profile_argv(profile: str, app: Any, extra: list[str], cpu_slots: int) -> list[str]:
    """The ``celery worker`` flags of a profile; flags the user gave win."""
    cfg = _config(app)
    default_queue = app.conf.task_default_queue or "celery"
    queues = {"heavy": [cfg.heavy_queue], "light": [default_queue], "all": [default_queue, cfg.heavy_queue]}
    concurrency = {"heavy": max(1, cpu_slots), "light": max(2, cpu_slots * 2), "all": max(2, cpu_slots)}
    prefetch = {"heavy": 1, "light": 4, "all": 1}
    argv: list[str] = []
    if not _has_flag(extra, "-Q", "--queues"):
        argv += ["-Q", ",".join(queues[profile])]
    if not _has_flag(extra, "-c", "--concurrency", "--autoscale"):
        argv += ["-c", str(concurrency[profile])]
    if not _has_flag(extra, "--prefetch-multiplier"):
        argv += ["--prefetch-multiplier", str(prefetch[profile])]
    return argv + extra


def _config(app: Any) -> Any:
    from rmq.core.runtime import config_for

    try:
        return config_for(app)
    except ConfigError as exc:
        exit_with_line(f"configuration error: {exc}")


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    app = _load_app(args.app)
    _config(app)
    for i, a in enumerate(extra):
        value = a.split("=", 1)[1] if a.startswith("--autoscale=") else (
            extra[i + 1] if a == "--autoscale" and i + 1 < len(extra) else None)
        if value is not None:
            try:
                parse_autoscale(value)
            except ConfigError as exc:
                exit_with_line(str(exc))
    from rmq.cpu.slots import detect_cpu_slots

    cfg = _config(app)
    slots = cfg.cpu_slots or detect_cpu_slots()[0]
    argv = [sys.executable, "-m", "celery", "-A", _app_name(args.app), "worker",
            *profile_argv(args.profile, app, extra, slots)]
    if args.dry_run:
        print(" ".join(argv))
        return 0
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_flower(args: argparse.Namespace, extra: list[str]) -> int:
    """``celery flower`` with rmq's Resources pages; Flower's own options pass through."""
    from rmq.celery.flower import run_flower

    name = _app_name(args.app)
    _config(_load_app(name))  # a bad app or configuration: one line, before Flower starts
    return run_flower(name, extra)


def cmd_doctor(args: argparse.Namespace) -> int:
    from rmq.core.runtime import redis_url_for_app
    from rmq.core.units import format_bytes
    from rmq.cpu.slots import detect_cpu_slots
    from rmq.memory.budget import detect_budget
    from rmq.memory.lines import lines_for
    from rmq.memory.pool_cgroups import choose_accounting
    from rmq.memory.probes import HostProbe

    app = _load_app(args.app)
    cfg = _config(app)
    limit = detect_budget(cfg)
    # what a worker started here would choose; nothing is created or moved
    accounting = choose_accounting(limit.cgroup or HostProbe().memory_cgroup(), os.getpid(),
                                   cfg.kernel_accounting, limit.cgroup is not None, dry_run=True)
    lines = lines_for(cfg, accounting.kernel, limit.limit_bytes)
    budget = detect_budget(cfg, percent=lines.budget_percent)
    slots, slot_source = (cfg.cpu_slots, "configured") if cfg.cpu_slots else detect_cpu_slots()
    ok = True
    print(f"memory budget   {format_bytes(budget.budget_bytes)} ({budget.source}; "
          f"limit {format_bytes(budget.limit_bytes)})")
    print(f"accounting      {accounting.mode}: {accounting.reason}")
    wakeups = {"cgroup-v1": "kernel: eventfd thresholds on memory.usage_in_bytes, memory.oom_control",
               "cgroup-v2": "kernel: memory.events and PSI triggers on memory.pressure"}
    print(f"wake-ups        {wakeups.get(accounting.mode, f'polling every {cfg.monitor_interval * 1000:.0f} ms')}")
    print(f"admit line      {format_bytes(budget.line(lines.admit))} ({lines.admit:.0%}, {lines.source})")
    print(f"ladder          unload {lines.unload:.0%} / pause {lines.pause:.0%} / kill {lines.kill:.0%}")
    print(f"cpu slots       {slots} ({slot_source})")
    print(f"session root    {cfg.session_root_path}")
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        print(f"broker          reachable ({conn.as_uri()})")
    except Exception as exc:
        ok = False
        print(f"broker          UNREACHABLE: {exc}")
    else:
        ok = _adoption(app, cfg) and ok
    url = redis_url_for_app(cfg, app)
    if url:
        try:
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
            print("rmq redis       reachable (rate limits, learned declarations)")
        except Exception as exc:
            ok = False
            print(f"rmq redis       UNREACHABLE: {exc}")
    else:
        print("rmq redis       none (set rmq_redis_url for rate limits and learned declarations)")
    print("config          ok")
    return 0 if ok else 1


def _adoption(app: Any, cfg: Any) -> bool:
    """Print the hazards of adopting rmq on this deployment (rmq/celery/adoption.py); False if any."""
    from rmq.celery.adoption import adoption_findings

    try:
        findings = adoption_findings(app, cfg)
    except Exception as exc:  # the checks are advice: one that cannot run is said, not fatal
        print(f"adoption        not checked: {exc!r}")
        return True
    for f in findings:
        print(f"adoption        {'HAZARD' if f.hazard else 'ok'} {f.check}: {f.summary}")
        if f.hazard:
            print(f"                fix: {f.fix}")
    return not any(f.hazard for f in findings)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from rmq.core.units import parse_duration
    from rmq.disk.cleanup import cleanup_from_config, format_report

    app = _load_app(args.app)
    cfg = _config(app)
    try:
        older = parse_duration(args.older_than, "--older-than") if args.older_than else None
    except ConfigError as exc:
        exit_with_line(str(exc))
    report = cleanup_from_config(cfg, dry_run=args.dry_run, older_than_s=older)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 1 if report.errors else 0


def cmd_status(args: argparse.Namespace) -> int:
    from rmq.monitoring.cluster import load_or_collect

    app = _load_app(args.app)
    _config(app)

    def view() -> dict[str, Any]:
        return load_or_collect(app, live=args.live or args.watch)

    if args.json:
        from rmq.monitoring.status import render_json

        print(render_json(view()))
        return 0
    from rich.console import Console

    console = Console()
    from rmq.monitoring.status import render_plain, render_table

    if args.watch:
        import time

        from rich.live import Live

        with Live(render_table(view()), console=console, refresh_per_second=2) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(render_table(view()))
            except KeyboardInterrupt:
                return 0
    if console.is_terminal:
        console.print(render_table(view()))
    else:
        print(render_plain(view()))
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rmq.monitoring.cluster import configured_queues, load_view, queue_depths_by_priority
    from rmq.monitoring.exporter import QueueCollector, start_exporter
    from rmq.monitoring.metrics import stop_metrics_server

    app = _load_app(args.app)
    _config(app)

    def names() -> set[str]:
        found = set(configured_queues(app)) | set(args.queue or ())
        try:  # the monitor's view knows the queues workers consume (on RabbitMQ nothing else does)
            found |= set(((load_view(app) or {}).get("queues")) or {})
        except Exception:  # no view to read: the configured queues still answer
            pass
        return found

    collector = QueueCollector(lambda queues: queue_depths_by_priority(app, queues, discover=True), names)
    try:
        server, _, port = start_exporter(collector, args.port, args.addr)
    except OSError as exc:
        exit_with_line(f"cannot listen on {args.addr}:{args.port}: {exc}")
    print(f"rmq exporter on http://{args.addr}:{port}/metrics", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    stop_metrics_server(server)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    # the demo belongs to the reference application, not to the library: loaded by name at call time
    run_demo = importlib.import_module("workers.demo").run_demo

    try:
        return run_demo(broker=args.broker, sessions=args.sessions, plain=args.plain, timeout=args.timeout,
                        synthetic=args.synthetic, output=args.output)
    except KeyboardInterrupt:  # before the demo started anything, or after it cleaned up
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmq", description="Resource governance for Celery workers.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run celery worker with a profile's defaults (other flags pass through)")
    w.add_argument("-A", "--app")
    w.add_argument("--profile", choices=PROFILES, default="all")
    w.add_argument("--dry-run", action="store_true", help="print the celery command instead of running it")
    f = sub.add_parser("flower", help="Flower with rmq's Resources pages (Flower's options pass through)",
                       allow_abbrev=False)
    f.add_argument("-A", "--app")
    d = sub.add_parser("doctor", help="detected limits, config check, broker reachability")
    d.add_argument("-A", "--app")
    c = sub.add_parser("cleanup", help="clean this host's session root")
    c.add_argument("-A", "--app")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--older-than")
    c.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="workers, budgets, models and queue depths")
    s.add_argument("-A", "--app")
    s.add_argument("--watch", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--live", action="store_true", help="ask the workers now instead of reading the monitor's view")
    s.add_argument("--interval", type=float, default=2.0)
    e = sub.add_parser("exporter", help="serve the cluster's Prometheus metrics: queue depths per priority")
    e.add_argument("-A", "--app")
    e.add_argument("--port", type=int, default=9809, help="0 picks a free port (printed)")
    e.add_argument("--addr", default="127.0.0.1", help="address to listen on (0.0.0.0 for a Prometheus elsewhere)")
    e.add_argument("--queue", action="append", help="a queue to report besides the configured ones (repeatable)")
    m = sub.add_parser("demo", help="run the reference media pipeline on an embedded Redis")
    m.add_argument("--broker", help="use this broker (redis://...) instead of an embedded Redis")
    m.add_argument("--sessions", type=int, default=3)
    m.add_argument("--plain", action="store_true", help="plain lines instead of the live view")
    m.add_argument("--timeout", type=float, default=240.0)
    m.add_argument("--synthetic", action="store_true",
                   help="run the synthetic pipeline (real memory, no real models) even with the media extra")
    m.add_argument("--output", metavar="DIR", help="keep the encoded audio files in DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rmq`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("worker", "flower"):
        args, extra = parser.parse_known_args(argv)
        return (cmd_worker if args.command == "worker" else cmd_flower)(args, extra)
    args = parser.parse_args(argv)
    handlers = {"doctor": cmd_doctor, "cleanup": cmd_cleanup, "status": cmd_status, "demo": cmd_demo,
                "exporter": cmd_exporter}
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
