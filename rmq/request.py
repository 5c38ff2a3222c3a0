"""Deprecated alias, kept for one release: ``rmq.request:GovernedRequest`` in a task's ``Request``
setting still works. Use ``rmq.celery.request:GovernedRequest``."""

import warnings

from rmq.celery.request import GovernedRequest

__all__ = ["GovernedRequest"]

warnings.warn("rmq.request moved to rmq.celery.request", DeprecationWarning, stacklevel=2)
