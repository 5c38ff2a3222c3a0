"""The ``rmq`` command has no app of its own: it runs the one named by ``-A`` or ``RMQ_APP``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", [["status"], ["doctor"], ["cleanup", "--dry-run"], ["worker", "--dry-run"],
                                     ["flower", "--port=0"]])
def test_without_an_app_the_command_says_so_in_one_line_and_exits_2(command: list[str], tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RMQ_APP"}
    proc = subprocess.run([sys.executable, "-m", "rmq.cli", *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rmq: which Celery app? give -A APP (as for celery) or set RMQ_APP"]
