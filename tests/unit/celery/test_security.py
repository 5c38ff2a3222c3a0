"""Security defaults (docs/guarantees.md#security): JSON only unless the user opts in to pickle; remote-control
commands take no paths, and cleanup stays inside its configured root."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.utils.serialization import strtobool
from celery.worker.control import Panel

import rmq
from rmq.celery import control
from rmq.testing.worker import WorkerProcess, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PATHLIKE = ("path", "root", "dir", "file", "directory", "folder", "dest", "target", "where")


def fresh_app(**conf) -> Celery:
    app = Celery("sec", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(conf)
    return rmq.install(app)


def test_install_leaves_json_as_the_only_accepted_content():
    app = fresh_app()
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert "pickle" not in (app.conf.result_accept_content or app.conf.accept_content)


def test_a_user_who_opts_in_to_pickle_keeps_it():
    app = fresh_app(task_serializer="pickle", accept_content=["json", "pickle"])
    assert app.conf.task_serializer == "pickle"
    assert list(app.conf.accept_content) == ["json", "pickle"]


def rmq_commands() -> dict[str, object]:
    return {name: meta for name, meta in Panel.meta.items() if name.startswith("rmq")}


def test_rmq_registers_only_known_remote_control_commands():
    assert set(rmq_commands()) == {"rmq", "rmq_cleanup"}


def test_remote_control_commands_take_no_paths():
    for name, meta in rmq_commands().items():
        for arg, kind in meta.args or []:
            assert not any(word in arg.lower() for word in PATHLIKE), f"{name} takes {arg!r}"
            assert kind in (strtobool, bool, int, float), f"{name}({arg}) takes free-form {kind!r}"
    assert not (rmq_commands()["rmq"].args or [])
    assert [a for a, _ in rmq_commands()["rmq_cleanup"].args] == ["dry_run"]


def _old_session(root: Path, name: str = "session_old") -> Path:
    d = root / name
    d.mkdir(parents=True)
    f = d / "data.bin"
    f.write_bytes(b"x" * 1000)
    old = time.time() - 3 * 86400
    os.utime(f, (old, old))
    os.utime(d, (old, old))
    return d


def fake_state(session_root: Path):
    from rmq.core.config import load_config

    cfg = load_config({"rmq_session_root": str(session_root), "rmq_session_max_age": "1h"}, environ={})
    step = SimpleNamespace(label="rmq governor", runtime=SimpleNamespace(config=cfg))
    return SimpleNamespace(consumer=SimpleNamespace(controller=SimpleNamespace(steps=[step])))


@pytest.mark.parametrize("extra", [{"root": "/etc"}, {"path": "/"}, {"session_root": "/tmp"}])
def test_rmq_cleanup_with_path_arguments_answers_an_error_and_removes_nothing(tmp_path, extra):
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    inside_old, outside_old = _old_session(root), _old_session(outside)
    extra = {k: str(outside) for k in extra}  # point the "path" at a directory with a removable session
    reply = control.rmq_cleanup(fake_state(root), **extra)
    assert "error" in reply and "dry_run" in reply["error"]
    assert inside_old.exists() and outside_old.exists()


def test_rmq_cleanup_refuses_a_non_boolean_dry_run(tmp_path):
    root = tmp_path / "sessions"
    old = _old_session(root)
    reply = control.rmq_cleanup(fake_state(root), dry_run="/etc")
    assert "error" in reply
    assert old.exists()


def test_a_governed_worker_refuses_pickle_and_confines_cleanup_to_its_root(redis_url, tmp_path):
    """Integration: a real governed worker drops a pickled message, answers an error to a
    broadcast ``rmq_cleanup`` with a path, and a plain one cleans only inside its root."""
    import workers.tasks  # noqa: F401  (workers.noop)
    from workers.app import make_app

    root, outside = tmp_path / "sessions", tmp_path / "outside"
    inside_old, outside_old = _old_session(root), _old_session(outside)
    env = {"RMQ_BROKER_URL": redis_url, "RMQ_RESULT_BACKEND": redis_url, "RMQ_SESSION_ROOT": str(root),
           "RMQ_SESSION_MAX_AGE": "1h"}
    client = make_app(broker=redis_url, backend=redis_url)
    w = WorkerProcess(env=env, concurrency=1, cwd=ROOT).start()
    try:
        w.wait_ready(client, timeout=60)
        noop = client.tasks["workers.noop"]
        pickled = noop.apply_async((1,), serializer="pickle")
        assert noop.apply_async((2,)).get(timeout=20) == 2  # JSON runs
        wait_until(lambda: "untrusted content" in w.log(), 10, what="the worker to refuse the pickled message")
        assert pickled.state == "PENDING"  # never ran
        replies = client.control.broadcast("rmq_cleanup", arguments={"root": str(outside)}, reply=True,
                                           destination=[w.node_name], timeout=5)
        assert "error" in replies[0][w.node_name]
        assert inside_old.exists() and outside_old.exists()
        replies = client.control.broadcast("rmq_cleanup", arguments={"dry_run": False}, reply=True,
                                           destination=[w.node_name], timeout=10)
        assert replies[0][w.node_name].get("removed") == 1, replies
        assert not inside_old.exists() and outside_old.exists()
    finally:
        w.finish()
        client.close()
