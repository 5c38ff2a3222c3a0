"""Draw the main panels of the Grafana dashboard (deploy/grafana/rmq.json) from a live Prometheus.

There is no Grafana here: this runs each panel's own queries through Prometheus' query API and draws
them with matplotlib, for docs/operations-dashboard.png. The integration test
tests/integration/test_ops_prometheus.py calls it when RMQ_DASHBOARD_PNG names the output file:

    RMQ_DASHBOARD_PNG=docs/operations-dashboard.png pytest tests/integration/test_ops_prometheus.py

or against any Prometheus that scrapes rmq: python scripts/render_dashboard.py URL OUT.png [SECONDS]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "rmq.json")
PANELS = (
    "Messages waiting per priority", "Memory against budget and lines", "Time paused", "Tasks admitted",
    "Deferrals by reason", "Model loads and unloads", "Rate-limit waits", "Memory per pool process",
)
BYTE_UNITS = {"bytes", "Bps"}


def _range(url: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=20) as response:
        return list(json.loads(response.read())["data"]["result"])


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def render(url: str, path: str, highlight: str | None = None, seconds: float = 60.0) -> None:
    """Draw the panels of ``PANELS`` over the last ``seconds`` into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(DASHBOARD) as fh:
        panels = {p["title"]: p for p in json.load(fh)["panels"] if p["type"] != "row"}
    end = time.time()
    start = end - seconds
    fig, axes = plt.subplots(4, 2, figsize=(13, 12), dpi=80)
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = panels[title]
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        scale = 1 / 2**20 if unit in BYTE_UNITS else 1.0
        for target in panel["targets"]:
            expr = target["expr"].replace("$instance", ".+").replace("$queue", ".+")
            expr = expr.replace("$__rate_interval", "10s")
            for series in _range(url, expr, start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) * scale for _, v in series["values"]]
                if not any(ys) and len(ax.get_lines()) >= 2:  # a flat zero says nothing once others are drawn
                    continue
                label = _legend(target.get("legendFormat", ""), series["metric"])
                if highlight:
                    label = label.replace(highlight, "heavy").replace("127.0.0.1:", "w:")
                ax.plot(xs, ys, label=label[:40], linewidth=1.5)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel({"bytes": "MiB", "Bps": "MiB/s"}.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("rmq dashboard panels, from a live Prometheus scraping two workers and the exporter", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    render(sys.argv[1], sys.argv[2], seconds=float(sys.argv[3]) if len(sys.argv) > 3 else 600.0)
