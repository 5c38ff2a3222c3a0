"""Monitoring: the governor's snapshot, per-worker Prometheus metrics, alerts with hysteresis and
cool-down, the cluster view kept in Redis and its rendering for ``rmq status``.

One module per concern: ``snapshot`` and ``metrics`` (what a worker shows), ``alerts`` (rules and the
engine, pure), ``sinks`` and ``webhook`` (where alerts go), ``worker_monitor`` (the alert loop and
the concern that wires it into a worker), ``cluster_checks`` (alerts only the cluster view can
raise), ``cluster`` and ``queues`` (gathering the view), ``status`` (rendering it). Nothing here
imports Celery: the Celery layer passes in what is its own, such as the signal sink. How it fits
together: ``docs/design.md#monitoring``; running it (Flower, Prometheus, ``rmq status``):
``docs/operations.md``.
"""
