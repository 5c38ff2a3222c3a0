"""Monitoring: the governor's snapshot, per-worker Prometheus metrics, alerts with hysteresis and
cool-down, the cluster view kept in Redis and its rendering for ``rmq status``."""
