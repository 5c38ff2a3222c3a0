"""A test app whose tasks keep their memory in subprocesses (an encoder, ``ffmpeg``-style)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import workers.tasks  # noqa: F401  (the reference tasks)
from rmq import governed_task
from workers.app import make_app

app = make_app()
app.set_current()

#: holds ``argv[1]`` MiB (touched) for ``argv[2]`` seconds
HOLD = "import sys, time; b = b'\\1' * (int(sys.argv[1]) << 20); time.sleep(float(sys.argv[2]))"

#: grows by ``argv[1]`` MiB every ``argv[2]`` seconds, without bound (up to ``argv[3]`` MiB, so that a
#: governor that does not see it cannot take the test machine down)
GROW = (
    "import sys, time\n"
    "blocks = []\n"
    "while True:\n"
    "    if len(blocks) * int(sys.argv[1]) < int(sys.argv[3]):\n"
    "        blocks.append(b'\\1' * (int(sys.argv[1]) << 20))\n"
    "    time.sleep(float(sys.argv[2]))\n"
)

#: leaves its session and double-forks (a daemon), then the grandchild writes its pid to argv[3] and grows
#: (up to argv[4] MiB)
DAEMON = (
    "import os, sys, time\n"
    "os.setsid()\n"
    "if os.fork():\n    os._exit(0)\n"
    "if os.fork():\n    os._exit(0)\n"
    "with open(sys.argv[3], 'a') as fh:\n    fh.write(f'{os.getpid()}\\n')\n"
    "blocks = []\n"
    "while True:\n"
    "    if len(blocks) * int(sys.argv[1]) < int(sys.argv[4]):\n"
    "        blocks.append(b'\\1' * (int(sys.argv[1]) << 20))\n"
    "    time.sleep(float(sys.argv[2]))\n"
)

#: the same daemon, but it only lives ``argv[1]`` seconds and touches nothing
SHORT_DAEMON = (
    "import os, sys, time\n"
    "os.setsid()\n"
    "if os.fork():\n    os._exit(0)\n"
    "if os.fork():\n    os._exit(0)\n"
    "with open(sys.argv[2], 'a') as fh:\n    fh.write(f'{os.getpid()}\\n')\n"
    "time.sleep(float(sys.argv[1]))\n"
)


def _note(path: str | None, pid: int) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(f"{pid}\n")


def _run(args: list[str], pid_file: str | None = None) -> int:
    child = subprocess.Popen([sys.executable, "-c", *args])
    _note(pid_file, child.pid)
    return child.wait()


@governed_task(name="tree.sub_touch")
def sub_touch(mib: int = 300, hold_s: float = 1.0) -> dict:
    """Declares nothing; its memory lives in a subprocess that holds ``mib`` MiB for ``hold_s`` s."""
    started = time.time()
    code = _run([HOLD, str(mib), str(hold_s)])
    return {"pid": os.getpid(), "started": started, "ended": time.time(), "code": code}


@governed_task(memory="64MiB", name="tree.sub_hold")
def sub_hold(mib: int, hold_s: float) -> dict:
    """Declares 64 MiB (a lie) and holds ``mib`` MiB in a subprocess for ``hold_s`` seconds."""
    started = time.time()
    code = _run([HOLD, str(mib), str(hold_s)])
    return {"pid": os.getpid(), "started": started, "ended": time.time(), "code": code}


@governed_task(memory="400MiB", name="tree.declared")
def declared(hold_s: float = 0.2) -> dict:
    """Declares 400 MiB, touches nothing."""
    started = time.time()
    time.sleep(hold_s)
    return {"pid": os.getpid(), "started": started, "ended": time.time()}


@governed_task(memory="100MiB", name="tree.sub_grow")
def sub_grow(pid_file: str, step_mib: int = 40, pause_s: float = 0.05, cap_mib: int = 3000) -> int:
    """Declares 100 MiB; its subprocess grows without bound (a runaway encoder)."""
    _note(pid_file, os.getpid())
    return _run([GROW, str(step_mib), str(pause_s), str(cap_mib)], pid_file)


@governed_task(name="tree.sub_daemon")
def sub_daemon(pid_file: str, step_mib: int = 40, pause_s: float = 0.05, cap_mib: int = 3000) -> str:
    """Declares nothing; starts a daemon (setsid + double fork) that grows without bound, and waits for
    it to go away."""
    _note(pid_file, os.getpid())
    _run([DAEMON, str(step_mib), str(pause_s), pid_file, str(cap_mib)], pid_file)
    while True:
        time.sleep(0.05)


@governed_task(memory="64MiB", name="tree.short_daemon")
def short_daemon(pid_file: str, live_s: float = 0.3) -> int:
    """Starts a daemon that ends on its own after ``live_s`` seconds, and returns at once. The launcher's
    pid goes to ``pid_file``, the daemon's to ``pid_file + ".daemon"``."""
    return _run([SHORT_DAEMON, str(live_s), pid_file + ".daemon"], pid_file)
