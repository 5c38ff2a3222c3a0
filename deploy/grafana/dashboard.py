"""The rmq Grafana dashboard, generated with grafana-foundation-sdk (never edit rmq.json by hand).

    python deploy/grafana/dashboard.py            # rewrites deploy/grafana/rmq.json
    python deploy/grafana/dashboard.py --check    # exit 1 when rmq.json is not what this code makes

One row per concern. Queries expect the scrape jobs of deploy/prometheus/prometheus.yml: every
worker's endpoint in job ``rmq-workers`` and ``rmq exporter`` (queue depths) in job ``rmq-exporter``.
tests/integration/test_ops_prometheus.py runs every query against a Prometheus that scraped real
workers and checks that each returns series.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh

OUTPUT = Path(__file__).with_name("rmq.json")
UID = "rmq-operations"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: a worker's series, narrowed by the dashboard's instance picker
W = 'job="rmq-workers", instance=~"$instance"'
#: a queue's series, narrowed by the queue picker
Q = 'job="rmq-exporter", queue=~"$queue"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    """One panel: its kind (``timeseries``, ``stat``, ``state``), unit and queries ``(expr, legend)``."""

    title: str
    description: str
    queries: list[tuple[str, str]]
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 8
    extra: dict[str, object] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        Panel("Workers answering", "Targets of the rmq-workers job whose last scrape succeeded.",
              [('sum(up{job="rmq-workers"})', "workers")], kind="stat", width=6),
        Panel("Messages waiting", "Every queue, every priority list.",
              [(f"sum(rmq_queue_messages{{{Q}}})", "messages")], kind="stat", width=6),
        Panel("Workers paused", "Workers that stopped fetching because of memory pressure.",
              [(f"sum(rmq_paused{{{W}}})", "paused")], kind="stat", width=6),
        Panel("Kills in the last day", "Pool processes the governor killed, and the kernel's OOM kills.",
              [(f"sum(increase(rmq_killed_total{{{W}}}[1d]))", "governor"),
               (f"sum(increase(rmq_memory_oom_kills_total{{{W}}}[1d]))", "kernel OOM")], kind="stat", width=6),
    ]),
    ("Queues", [
        Panel("Messages waiting per queue", "Depth of each queue, all priority lists summed (rmq exporter).",
              [(f"sum by (queue) (rmq_queue_messages{{{Q}}})", "{{queue}}")]),
        Panel("Messages waiting per priority", "Priority lists holding messages: on Redis each priority step "
              "is a list of its own; RabbitMQ reports one figure (priority=\"all\").",
              [(f"sum by (queue, priority) (rmq_queue_messages{{{Q}}}) > 0", "{{queue}} p{{priority}}")]),
        Panel("Consumers per queue", "Workers consuming each queue (a paused worker still counts).",
              [('sum by (queue) (rmq_queue_consumer{job="rmq-workers", queue=~"$queue"})', "{{queue}}")]),
    ]),
    ("Memory", [
        Panel("Memory against budget and lines", "What the worker uses (its process tree, or its cgroup's "
              "working set when larger) against its budget and the pause and kill lines.",
              [(f"rmq_memory_worker_bytes{{{W}}}", "{{instance}} used"),
               (f"rmq_memory_budget_bytes{{{W}}}", "{{instance}} budget"),
               (f'rmq_memory_line_bytes{{{W}, line=~"pause|kill"}}', "{{instance}} {{line}} line")],
              unit="bytes", width=12),
        Panel("Pressure zone", "The governor's zone: ok, unload (models unloaded), pause (no fetching), kill.",
              [(f"rmq_memory_zone{{{W}}} == 1", "{{instance}} {{zone}}")], kind="state", width=12),
        Panel("Time paused", "Share of the time each worker spent paused.",
              [(f"rate(rmq_paused_seconds_total{{{W}}}[{RATE}])", "{{instance}}")], unit="percentunit"),
        Panel("Memory per pool process", "Each pool slot keeps its series when its process is recycled.",
              [(f"rmq_memory_child_bytes{{{W}}}", "{{instance}} process {{process}}")], unit="bytes"),
        Panel("Accounting mode", "How each worker measures its memory (kernel cgroup or /proc).",
              [(f"rmq_memory_accounting_info{{{W}}}", "{{instance}} {{mode}}")], kind="stat"),
    ]),
    ("Admission", [
        Panel("Tasks admitted", "Governed tasks that got their reservation.",
              [(f"sum by (instance) (rate(rmq_admitted_total{{{W}}}[{RATE}]))", "{{instance}}")], unit="ops"),
        Panel("Deferrals by reason", "Tasks sent back to wait: memory, cpu, rate_limit, concurrency, ...",
              [(f"sum by (reason) (rate(rmq_deferred_total{{{W}}}[{RATE}]))", "{{reason}}")], unit="ops"),
        Panel("Memory reserved", "Memory the ledger's reservations hold against each budget.",
              [(f"rmq_reserved_memory_bytes{{{W}}}", "{{instance}} reserved"),
               (f'rmq_memory_line_bytes{{{W}, line="admit"}}', "{{instance}} admit line")], unit="bytes"),
    ]),
    ("Kills", [
        Panel("Governor kills", "Pool processes killed over the kill line.",
              [(f"sum by (instance) (increase(rmq_killed_total{{{W}}}[{RATE}]))", "{{instance}}")], width=12),
        Panel("Kernel OOM kills", "OOM kills the kernel made in the worker's memory cgroup: the governor was "
              "too late.",
              [(f"sum by (instance) (increase(rmq_memory_oom_kills_total{{{W}}}[{RATE}]))", "{{instance}}")],
              width=12),
    ]),
    ("Models", [
        Panel("Model loads and unloads", "Loads, and unloads by reason (pressure, admission, cap, ...).",
              [(f"sum by (instance) (rate(rmq_models_loads_total{{{W}}}[{RATE}]))", "{{instance}} loads"),
               (f"sum by (instance, reason) (rate(rmq_models_evictions_total{{{W}}}[{RATE}]))",
                "{{instance}} unloads ({{reason}})")], unit="ops"),
        Panel("Model bytes loaded and unloaded", "Bytes of models loaded and unloaded per second.",
              [(f"sum by (instance) (rate(rmq_models_bytes_loaded_total{{{W}}}[{RATE}]))", "{{instance}} loaded"),
               (f"sum by (instance) (rate(rmq_models_bytes_unloaded_total{{{W}}}[{RATE}]))",
                "{{instance}} unloaded")], unit="Bps"),
        Panel("Models resident", "Bytes of models held by each worker's pool processes.",
              [(f"sum by (instance) (rmq_models_bytes{{{W}}})", "{{instance}}")], unit="bytes"),
    ]),
    ("Rate limits", [
        Panel("Rate-limit outcomes", "Tokens granted and denied per cluster-wide limit.",
              [(f"sum by (limit) (rate(rmq_rate_limits_granted_total{{{W}}}[{RATE}]))", "{{limit}} granted"),
               (f"sum by (limit) (rate(rmq_rate_limits_denied_total{{{W}}}[{RATE}]))", "{{limit}} denied")],
              unit="ops", width=12),
        Panel("Rate-limit waits", "Seconds per second tasks spent waiting for a token.",
              [(f"sum by (limit) (rate(rmq_rate_limits_wait_s_total{{{W}}}[{RATE}]))", "{{limit}}")],
              unit="s", width=12),
    ]),
    ("Sessions and disk", [
        Panel("Sessions", "Session directories opened, removed and kept.",
              [(f"sum by (instance) (rate(rmq_sessions_opened_total{{{W}}}[{RATE}]))", "{{instance}} opened"),
               (f"sum by (instance) (rate(rmq_sessions_removed_total{{{W}}}[{RATE}]))", "{{instance}} removed")],
              unit="ops", width=12),
        Panel("Session root disk", "Used share of the filesystem holding each worker's session root.",
              [(f"rmq_disk_ratio{{{W}}}", "{{instance}}")], unit="percentunit", width=12,
              extra={"max": 1}),
    ]),
]


def _panel(spec: Panel, height: int, panel_id: int) -> object:
    builder: object
    if spec.kind == "stat":
        builder = stat.Panel()
    elif spec.kind == "state":
        builder = statetimeline.Panel()
    else:
        builder = timeseries.Panel().fill_opacity(10)
    panel = (builder.id(panel_id).title(spec.title).description(spec.description)  # type: ignore[attr-defined]
             .unit(spec.unit).datasource(DATASOURCE).span(spec.width).height(height))
    if "max" in spec.extra:
        panel = panel.min(0).max(float(spec.extra["max"]))  # type: ignore[arg-type]
    for ref, (expr, legend) in zip("ABCDEFGH", spec.queries, strict=False):
        panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE))
    return panel


def build() -> Dashboard:
    """The dashboard builder."""
    board = (
        Dashboard("rmq: Celery workers under resource governance")
        .uid(UID)
        .tags(["rmq", "celery", "generated"])
        .description("Generated by deploy/grafana/dashboard.py from grafana-foundation-sdk.")
        .refresh("30s")
        .time("now-3h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            QueryVariable("instance").label("Worker").datasource(DATASOURCE)
            .query('label_values(rmq_up{job="rmq-workers"}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        )
        .with_variable(
            QueryVariable("queue").label("Queue").datasource(DATASOURCE)
            .query('label_values(rmq_queue_messages{job="rmq-exporter"}, queue)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        )
    )
    ids = iter(range(1, 1000))  # Grafana wants every panel and row to have an id of its own
    for title, panels in ROWS:
        board = board.with_row(Row(title).id(next(ids)))
        height = 4 if all(p.kind == "stat" for p in panels) else 8
        for spec in panels:
            board = board.with_panel(_panel(spec, height, next(ids)))  # type: ignore[arg-type]
    return board


def render() -> str:
    """The dashboard's JSON, as committed in rmq.json."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def queries(dashboard: dict[str, object]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query of a dashboard's JSON."""
    out = []
    for panel in dashboard.get("panels") or []:  # type: ignore[attr-defined]
        for target in panel.get("targets") or []:
            out.append((panel["title"], target["expr"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when rmq.json differs from the generated one")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = OUTPUT.exists() and OUTPUT.read_text() == text
        print("rmq.json is up to date" if same else "rmq.json differs: run python deploy/grafana/dashboard.py")
        return 0 if same else 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(json.loads(text)['panels'])} panels and rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
