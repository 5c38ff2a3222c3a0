"""The reference pipeline for real (the media extra): one session spoken, heard, translated through
the rate-limited API, spoken again and encoded by ffmpeg, through a real worker on a real Redis; and an
ffmpeg that runs away, killed with its task (docs/design.md#task-trees)."""

from __future__ import annotations

import os
import re

import psutil
import pytest

from rmq.testing.worker import wait_until
from workers.phrasebook import PHRASES, sentence, word_error_rate
from workers.speech import missing_media

from .conftest import worker_env

pytestmark = pytest.mark.integration


@pytest.fixture
def real_app(redis_app):
    missing = missing_media()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"the media extra is not installed (missing {', '.join(missing)})")
    import workers.pipeline  # noqa: F401  (registers the pipeline's shared tasks)

    return redis_app


@pytest.fixture
def api():
    from workers.fake_api import start_in_thread

    server = start_in_thread(rate="5/s")
    yield server
    server.stop()


def _ffmpegs_under(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)
                if "ffmpeg" in p.name() and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def test_a_real_session_is_heard_translated_and_encoded_to_valid_audio(
    redis_url, real_app, start_worker, api, tmp_path
):
    from workers import audio, pipeline

    # Given a worker running the real pipeline, keeping its encoded files in out/
    out = tmp_path / "out"
    env = worker_env(redis_url, memory_budget="1GiB", pipeline_mode="real", pipeline_output_dir=out,
                     translate_url=api.url, session_root=tmp_path / "sessions")
    w = start_worker(real_app, app="workers.app", env=env, concurrency=1)
    said = sentence(4)
    # When one session runs through it
    last = pipeline.pipeline("real-1", "fr", app=real_app, text=said).apply_async()
    encoded = last.get(timeout=60)
    steps, node = [], last
    while node is not None:
        steps.insert(0, node)
        node = node.parent
    ingest, transcribe, translate, synthesize = [s.get(timeout=5) for s in steps[:4]]
    # Then every step succeeded, in real mode
    assert [s.state for s in steps] == ["SUCCESS"] * 5
    assert {r["mode"] for r in (ingest, transcribe, synthesize, encoded)} == {"real"}
    # the transcript recovers the words that were spoken
    assert ingest["text"] == said and ingest["seconds"] > 1.0
    assert word_error_rate(said, transcribe["text"]) <= 0.4, transcribe
    assert 0.5 < transcribe["speech_s"] <= ingest["seconds"]
    # the translation is the phrasebook's, through the API
    assert translate["text"] == PHRASES[said]["fr"] and translate["match"] >= 0.6
    # the output is valid audio that lasts as long as the French speech, kept outside the removed session
    assert encoded["file"] == str(out / "real-1.opus") and encoded["format"] == "opus"
    assert audio.decoded_seconds(encoded["file"]) == pytest.approx(synthesize["seconds"], abs=0.05)
    assert not (tmp_path / "sessions").exists() or not any((tmp_path / "sessions").rglob("speech.opus"))
    # the models live in the worker's cache (its gauges are published within a second): the recogniser
    # pinned, the voices not
    def held():
        stats = real_app.control.inspect(destination=[w.node_name], timeout=3).stats()[w.node_name]["rmq"]
        models = {m["name"]: m for g in stats["processes"].values() for m in (g.get("models") or [])}
        return models if {"asr_en", "vad", "tts_en", "tts_fr"} <= set(models) else None

    held = wait_until(held, 10, interval=0.2, what="the four models in the worker's snapshot")
    assert held["asr_en"]["pinned"] and not held["tts_fr"]["pinned"]
    # and no ffmpeg is left behind
    assert not _ffmpegs_under(w.pid)


def test_a_runaway_encoder_is_counted_in_its_task_and_killed_with_it(redis_url, real_app, start_worker):
    # Given a worker with a 640 MiB budget that kills a runaway once, without re-running it
    env = worker_env(redis_url, memory_budget="640MiB", pipeline_mode="real", memory_kill_retries=0)
    w = start_worker(real_app, app="workers.app", env=env, concurrency=1)
    # When the runaway task's ffmpeg grows without bound
    bad = real_app.tasks["pipeline.runaway"].delay()
    seen = wait_until(lambda: _ffmpegs_under(w.pid), 20, what="the runaway's ffmpeg")
    bad.get(timeout=60, propagate=False)
    # Then the task ends as a memory kill whose observed memory is the ffmpeg's (a pool process waiting
    # on a subprocess holds well under 256 MiB)
    assert bad.state == "FAILURE" and type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)
    observed = re.search(r"observed ([\d.]+)MiB", str(bad.result))
    assert observed and float(observed.group(1)) > 256, str(bad.result)
    # and the ffmpeg is gone with it
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in seen), 5, what=f"ffmpeg {seen} to be gone")
