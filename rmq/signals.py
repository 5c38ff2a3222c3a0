"""rmq's Celery signals: the public import path (``from rmq.signals import alert``).

Defined in :mod:`rmq.celery.signals`, the Celery layer.
"""

from rmq.celery.signals import alert

__all__ = ["alert"]
