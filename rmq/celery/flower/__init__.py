"""``rmq flower``: Flower with rmq's Resources pages added.

Flower has no plugin API, but it is a Tornado application: :class:`~rmq.celery.flower.app.RmqFlower`
is Flower's application class with rmq's read-only handlers added at start and a "Resources" link
in Flower's navigation bar. :func:`run_flower` runs Flower's own ``celery flower`` command (its
options, config file, ``FLOWER_*`` variables, authentication, URL prefix and persistence all apply
as they do there) with that class in place of Flower's, in this process only: plain
``celery flower`` is unchanged. What the pages show: ``docs/operations.md#flower``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["run_flower"]


def run_flower(app_name: str, flower_args: list[str]) -> int:
    """Run ``celery -A APP flower FLOWER_ARGS`` with rmq's pages; returns its exit status."""
    import flower.command
    from celery.bin.celery import celery

    from rmq.celery.flower.app import RmqFlower

    if not hasattr(flower.command, "Flower"):  # the one name rmq replaces in Flower's command
        from rmq.core.exits import exit_with_line

        exit_with_line("this Flower version has no flower.command.Flower: rmq flower cannot add its pages")
    # the command builds its application from this module-level name when it runs
    flower.command.Flower = RmqFlower
    sys.path.insert(0, os.getcwd())  # as `celery -A` finds the user's module in the current directory
    try:
        celery.main(args=["-A", app_name, "flower", *flower_args], prog_name="rmq",
                     auto_envvar_prefix="CELERY")
    except SystemExit as done:  # click ends with SystemExit(status)
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
