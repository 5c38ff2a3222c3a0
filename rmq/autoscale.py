"""Deprecated alias, kept for one release: ``worker_autoscaler = "rmq.autoscale:ResourceAutoscaler"``
still works. Use ``rmq.celery.autoscale:ResourceAutoscaler`` (what ``rmq.install`` sets)."""

import warnings

from rmq.celery.autoscale import ResourceAutoscaler

__all__ = ["ResourceAutoscaler"]

warnings.warn("rmq.autoscale moved to rmq.celery.autoscale", DeprecationWarning, stacklevel=2)
