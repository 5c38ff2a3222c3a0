"""Signals rmq sends, for code that wants to react in-process (Celery's signal machinery).

Example::

    from rmq.celery.signals import alert

    @alert.connect
    def page_someone(sender: str, alert: dict, **kwargs) -> None:
        ...  # sender is the worker hostname; alert is Alert.as_dict()

Receivers run in the worker's main process (the governor) and must return quickly; cluster
alerts (``sender="cluster"``) reach receivers in the process that runs the ``rmq.monitor`` task.
An exception in a receiver is logged by Celery and does not stop other receivers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery.utils.dispatch import Signal

if TYPE_CHECKING:
    from rmq.monitoring.alerts import Alert

__all__ = ["alert", "signal_sink"]

#: Sent once per alert raised (after hysteresis and cool-down): ``sender=hostname``,
#: ``alert={"name", "level", "value", "threshold", "message", "time", "hostname", "subject"}``.
alert = Signal(name="rmq.alert", providing_args={"alert"})


def signal_sink(raised: Alert) -> None:
    """The alert sink that sends :data:`alert` (``sender=hostname, alert=raised.as_dict()``).

    Monitoring imports no Celery, so the Celery layer hands this sink to it: to the worker's
    ``MonitoringConcern`` and to the cluster view the ``rmq.monitor`` beat task collects.
    """
    alert.send(sender=raised.hostname, alert=raised.as_dict())
