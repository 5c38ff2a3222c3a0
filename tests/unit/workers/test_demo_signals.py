"""The demo's Ctrl-C handler, in a real ``python -m`` process: a press exits 130, wherever it lands."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _run_module(tmp_path, body: str) -> int:
    (tmp_path / "pressed.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    return subprocess.run([sys.executable, "-m", "pressed"], env=env, timeout=60).returncode


# The press lands inside an exec of generated source, as it can inside Celery's signature check on a
# task's first apply_async; the demo catches it, cleans up and returns 130.
PRESS_INSIDE_EXEC = """
    import os, signal, sys
    from workers.demo import stop_on_signal

    signal.signal(signal.SIGINT, {handler})
    try:
        exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(1000): pass")
    except KeyboardInterrupt:
        pass
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a second press cannot cut the cleanup short
    sys.exit(130)
"""


def test_a_press_inside_generated_code_still_exits_130(tmp_path):
    assert _run_module(tmp_path, PRESS_INSIDE_EXEC.format(handler="stop_on_signal")) == 130


def test_the_python_behaviour_the_handler_steps_around(tmp_path):
    """A handler raising KeyboardInterrupt itself turns that same run into death by SIGINT."""
    plain = "lambda *_: (signal.signal(signal.SIGINT, signal.SIG_IGN), (_ for _ in ()).throw(KeyboardInterrupt))"
    assert _run_module(tmp_path, PRESS_INSIDE_EXEC.format(handler=plain)) == -2
