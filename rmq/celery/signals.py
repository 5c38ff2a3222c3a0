"""Signals rmq sends, for code that wants to react in-process (Celery's signal machinery).

Example::

    from rmq.celery.signals import alert

    @alert.connect
    def page_someone(sender: str, alert: dict, **kwargs) -> None:
        ...  # sender is the worker hostname; alert is Alert.as_dict()

Receivers run in the worker's main process (the governor) and must return quickly.
An exception in a receiver is logged by Celery and does not stop other receivers.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["alert"]

#: Sent once per alert raised (after hysteresis and cool-down): ``sender=hostname``,
#: ``alert={"name", "level", "value", "threshold", "message", "time", "hostname", "subject"}``.
alert = Signal(name="rmq.alert", providing_args={"alert"})
