"""The demo's Ctrl-C handling, in a real ``python -m`` process: a press exits 130, wherever it lands.

Each case runs the shape of ``run_demo`` (the body, then the cleanup with presses ignored) around
code the press can land in, as it did in the demo: Celery's generated signature check (an ``exec``
of source) and its lazily built classes (a descriptor's ``__set_name__``).
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

DEMO_SHAPE = """
import os, signal, sys
from workers.demo import StopOnSignals

def press():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs between bytecodes, here
        pass

def body():
{body}

presses = StopOnSignals()
interrupted = False
try:
    body()
    presses.check()
except BaseException:
    if not presses.pressed:
        raise
    interrupted = True
finally:
    presses.ignore()
    os.kill(os.getpid(), signal.SIGINT)  # a second press during the cleanup changes nothing
sys.exit(130 if interrupted else 0)
"""

LANDINGS = {
    "in_exec": "exec('press()')",
    "in_set_name": textwrap.dedent("""\
        class Descriptor:
            def __set_name__(self, owner, name):
                press()
        class Lazy:
            field = Descriptor()"""),
    "swallowed": textwrap.dedent("""\
        try:
            press()
        except BaseException:
            pass"""),
}


def _run_module(tmp_path, source: str) -> int:
    (tmp_path / "pressed.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    return subprocess.run([sys.executable, "-m", "pressed"], env=env, timeout=60).returncode


@pytest.mark.parametrize("landing", sorted(LANDINGS))
def test_a_press_exits_130_wherever_it_lands(tmp_path, landing):
    body = textwrap.indent(LANDINGS[landing], " " * 4)
    assert _run_module(tmp_path, DEMO_SHAPE.format(body=body)) == 130


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="measured on CPython 3.11, the version CI runs")
def test_the_python_behaviour_the_demo_steps_around(tmp_path):
    """Plain ``KeyboardInterrupt`` raised by a handler inside exec'd source, caught and followed by
    ``sys.exit(130)``: Python 3.11 ends that ``python -m`` run by SIGINT all the same."""
    source = textwrap.dedent("""
        import os, signal, sys
        def on_signal(signum, frame):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, on_signal)
        try:
            exec("os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(1000): pass")
        except KeyboardInterrupt:
            pass
        sys.exit(130)
    """)
    assert _run_module(tmp_path, source) == -2
