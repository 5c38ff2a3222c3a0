"""The reference media pipeline: ingest -> transcribe -> translate -> synthesize -> encode.

Every workload is SYNTHETIC: models are blocks of real memory with no weights, audio is random
bytes, "translation" is done by a local fake API (``workers.fake_api``) or, without one, locally.
What is real is the resource use: memory, CPU, disk, and calls through a rate-limited client.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import workers.app  # noqa: F401  (binds the shared tasks to the reference app)
from rmq import governed_task, models
from rmq.testing.synthetic_models import synthetic_loader

MiB = 1024 * 1024

# Synthetic models (sizes overridable for small machines and the docker heavy worker).
WHISPER_SIZE = os.environ.get("RMQ_DEMO_WHISPER_SIZE", "250MiB")
VOICE_SIZE = os.environ.get("RMQ_DEMO_VOICE_SIZE", "300MiB")
LANGUAGES = ("de", "fr", "es")

models.register("whisper_base", size=WHISPER_SIZE, pinned=True,
                loader=synthetic_loader("whisper_base", WHISPER_SIZE))
for _lang in LANGUAGES:
    models.register(f"tts_{_lang}", size=VOICE_SIZE, loader=synthetic_loader(f"tts_{_lang}", VOICE_SIZE))


def _step(self: Any, name: str, payload: dict[str, Any]) -> dict[str, Any]:
    path = self.session_dir / f"{name}.json"
    path.write_text(json.dumps(payload))
    return {"step": name, "pid": os.getpid(), **{k: v for k, v in payload.items() if k != "audio_sha"}}


@governed_task(bind=True, session=True, cleanup="keep", disk="64MiB", memory="96MiB", name="pipeline.ingest")
def ingest(self: Any, session_id: str, seconds: int = 30) -> dict[str, Any]:
    """Writes a synthetic recording (random bytes standing in for audio) into the session."""
    audio = os.urandom(seconds * 16000 * 2)
    (self.session_dir / "audio.raw").write_bytes(audio)
    return _step(self, "ingest", {"seconds": seconds, "audio_sha": hashlib.sha256(audio).hexdigest()})


@governed_task(bind=True, session=True, cleanup="keep", memory="160MiB", name="pipeline.transcribe")
def transcribe(self: Any, session_id: str) -> dict[str, Any]:
    """'Transcribes' with the pinned synthetic whisper model (real memory, trivial work)."""
    audio = (self.session_dir / "audio.raw").read_bytes()
    with models.use("whisper_base") as whisper:
        checksum = whisper.infer(len(audio))
    words = [f"word{i}" for i in range(len(audio) // 32000)]
    return _step(self, "transcribe", {"words": len(words), "checksum": checksum, "text": " ".join(words)})


@governed_task(bind=True, session=True, cleanup="keep", memory="64MiB", network=True,
               name="pipeline.translate")
def translate(self: Any, session_id: str, lang: str) -> dict[str, Any]:
    """Translates through the fake API with a cluster-wide rate limit (rmq.http), else locally."""
    text = json.loads((self.session_dir / "transcribe.json").read_text())["text"]
    url = os.environ.get("RMQ_TRANSLATE_URL")
    if url:
        from rmq import http

        api = http.client("translate-api", base_url=url, rate=os.environ.get("RMQ_TRANSLATE_RATE", "5/s"),
                          concurrency=2)
        translated = api.post("/translate", json={"text": text[:2000], "target": lang}).json()["translation"]
    else:
        translated = text[::-1]
    return _step(self, "translate", {"lang": lang, "chars": len(translated), "text": translated})


@governed_task(bind=True, session=True, cleanup="keep", memory="128MiB", name="pipeline.synthesize")
def synthesize(self: Any, session_id: str, lang: str) -> dict[str, Any]:
    """'Speaks' with the language's synthetic voice model: the models outgrow the budget together."""
    text = json.loads((self.session_dir / "translate.json").read_text())["text"]
    with models.use(f"tts_{lang}") as voice:
        checksum = voice.infer(len(text))
    speech = os.urandom(len(text) * 64)
    (self.session_dir / "speech.raw").write_bytes(speech)
    return _step(self, "synthesize", {"lang": lang, "bytes": len(speech), "checksum": checksum})


@governed_task(bind=True, session=True, cleanup="after_task", cpu=2, memory="128MiB",
               name="pipeline.encode")
def encode(self: Any, session_id: str, rounds: int = 40) -> dict[str, Any]:
    """CPU-heavy 'encoding' (repeated hashing of the speech); the session is removed afterwards."""
    data = (self.session_dir / "speech.raw").read_bytes()
    started = time.process_time()
    digest = b""
    for _ in range(rounds):
        digest = hashlib.sha256(data + digest).digest()
    (self.session_dir / "out.bin").write_bytes(digest)
    return {"step": "encode", "pid": os.getpid(), "cpu_s": round(time.process_time() - started, 3)}


@governed_task(memory="128MiB", name="pipeline.runaway")
def runaway(step_mib: int = 16, pause_s: float = 0.05) -> None:
    """A synthetic bug: allocates without bound until the governor kills it."""
    blocks = []
    while True:
        block = bytearray(step_mib * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(pause_s)


def pipeline(session_id: str, lang: str, seconds: int = 30, app: Any = None) -> Any:
    """The chain of one session (bound to ``app``, default the reference app)."""
    from celery import chain

    from workers import app as reference

    tasks = (app or reference.app).tasks
    return chain(
        tasks["pipeline.ingest"].si(session_id=session_id, seconds=seconds),
        tasks["pipeline.transcribe"].si(session_id=session_id),
        tasks["pipeline.translate"].si(session_id=session_id, lang=lang),
        tasks["pipeline.synthesize"].si(session_id=session_id, lang=lang),
        tasks["pipeline.encode"].si(session_id=session_id),
    )
