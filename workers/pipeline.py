"""The reference media pipeline: ingest -> transcribe -> translate -> synthesize -> encode.

It runs in one of two modes, chosen per worker by ``RMQ_PIPELINE_MODE`` (``real`` or ``synthetic``;
by default real when the ``media`` extra is installed, see :func:`mode`):

- **real**: ``ingest`` speaks the session's English text with an eSpeak NG voice (``input.wav``, in
  place of a recording); ``transcribe`` finds the speech in it (Silero VAD) and recognises it
  (PocketSphinx, the pinned ``asr_en`` model); ``translate`` calls the rate-limited translation API;
  ``synthesize`` speaks the translation with that language's voice (``speech.wav``); ``encode`` runs
  ``ffmpeg`` as a subprocess in the session directory (``speech.opus``), checks that the file decodes
  and reports its duration. Voices, recogniser and detector are models in rmq's cache: loaded once
  per process, leased while used, unloaded under pressure.
- **synthetic**: models are blocks of real memory without weights (``synthetic_*``), audio is random
  bytes and encoding is hashing. For machines without the ``media`` extra, and for tests that need
  exact memory figures.

The runaway task is real in both modes: in real mode an ``ffmpeg`` that holds everything it decodes,
in synthetic mode Python allocating without bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

import workers.app  # noqa: F401  (binds the shared tasks to the reference app)
from rmq import governed_task, models
from rmq.testing.synthetic_models import synthetic_loader
from workers import audio, phrasebook, speech

MiB = 1024 * 1024
ASR_RATE = 16000

# Synthetic models (sizes overridable for small machines and the docker heavy worker).
WHISPER_SIZE = os.environ.get("RMQ_DEMO_WHISPER_SIZE", "250MiB")
VOICE_SIZE = os.environ.get("RMQ_DEMO_VOICE_SIZE", "300MiB")
LANGUAGES = phrasebook.LANGUAGES



def load_asr() -> speech.Recognizer:
    """The speech recogniser, with the phrasebook's language model."""
    return speech.Recognizer(phrasebook.PHRASES)


def voice_loader(lang: str) -> Any:
    """A loader of the eSpeak NG voice of ``lang``."""

    def load_voice() -> speech.Voice:
        return speech.Voice(speech.voice_name(lang))

    load_voice.__qualname__ = f"voice_loader.<{lang}>"
    return load_voice


# Real models: their sizes are measured at load (the process's growth), as nobody can declare them better
models.register("asr_en", pinned=True, loader=load_asr)
models.register("vad", loader=speech.SpeechDetector)
for _lang in ("en", *LANGUAGES):
    models.register(f"tts_{_lang}", loader=voice_loader(_lang))

models.register("synthetic_asr", size=WHISPER_SIZE, pinned=True,
                loader=synthetic_loader("synthetic_asr", WHISPER_SIZE))
for _lang in LANGUAGES:
    models.register(f"synthetic_tts_{_lang}", size=VOICE_SIZE,
                    loader=synthetic_loader(f"synthetic_tts_{_lang}", VOICE_SIZE))


@cache
def _missing_media() -> tuple[str, ...]:
    return tuple(speech.missing_media())


def mode() -> str:
    """``"real"`` or ``"synthetic"``: ``RMQ_PIPELINE_MODE`` if set, else real when the ``media``
    extra is installed.

    Raises:
        ValueError: ``RMQ_PIPELINE_MODE`` is something else.
    """
    wanted = os.environ.get("RMQ_PIPELINE_MODE", "").strip().lower()
    if wanted in ("real", "synthetic"):
        return wanted
    if wanted:
        raise ValueError(f"RMQ_PIPELINE_MODE must be 'real' or 'synthetic', got {wanted!r}")
    return "synthetic" if _missing_media() else "real"


def _real() -> bool:
    if mode() == "synthetic":
        return False
    if _missing_media():
        raise RuntimeError(f"the real pipeline needs the media extra (pip install 'rmq[media]'); "
                           f"missing: {', '.join(_missing_media())}")
    return True


def _step(self: Any, name: str, payload: dict[str, Any]) -> dict[str, Any]:
    path = self.session_dir / f"{name}.json"
    path.write_text(json.dumps(payload))
    return {"step": name, "pid": os.getpid(), **{k: v for k, v in payload.items() if k != "audio_sha"}}


def _read(self: Any, step: str) -> dict[str, Any]:
    return json.loads((self.session_dir / f"{step}.json").read_text())  # type: ignore[no-any-return]


@governed_task(bind=True, session=True, cleanup="keep", disk="64MiB", memory="96MiB", name="pipeline.ingest")
def ingest(self: Any, session_id: str, seconds: int = 30, text: str | None = None) -> dict[str, Any]:
    """The session's recording: ``text`` spoken by the English voice (real; default: a phrasebook
    sentence chosen by the session id), or ``seconds`` of random bytes (synthetic)."""
    if not _real():
        data = os.urandom(seconds * 16000 * 2)
        (self.session_dir / "audio.raw").write_bytes(data)
        return _step(self, "ingest", {"mode": "synthetic", "seconds": seconds,
                                      "audio_sha": hashlib.sha256(data).hexdigest()})
    if text is None:
        text = phrasebook.sentence(int(hashlib.sha256(session_id.encode()).hexdigest(), 16))
    with models.use("tts_en") as voice:
        pcm = voice.speak(text)
        rate = voice.sample_rate
    duration = audio.write_wav(self.session_dir / "input.wav", pcm, rate)
    return _step(self, "ingest", {"mode": "real", "text": text, "seconds": round(duration, 3)})


@governed_task(bind=True, session=True, cleanup="keep", memory="160MiB", name="pipeline.transcribe")
def transcribe(self: Any, session_id: str) -> dict[str, Any]:
    """Finds the speech in the recording and recognises it with the pinned ASR model (real), or
    'transcribes' with the pinned synthetic model (real memory, trivial work)."""
    if not _real():
        data = (self.session_dir / "audio.raw").read_bytes()
        with models.use("synthetic_asr") as whisper:
            checksum = whisper.infer(len(data))
        words = [f"word{i}" for i in range(len(data) // 32000)]
        return _step(self, "transcribe", {"mode": "synthetic", "words": len(words), "checksum": checksum,
                                          "text": " ".join(words)})
    pcm, rate = audio.read_wav(self.session_dir / "input.wav")
    pcm = audio.resample(pcm, rate, ASR_RATE)
    start, end, speech_s = 0, len(pcm), len(pcm) / ASR_RATE
    if speech.SpeechDetector.available():
        with models.use("vad") as vad:
            start, end, speech_s = vad.speech(pcm)
    text = ""
    if end > start:
        with models.use("asr_en") as asr:
            text = asr.transcribe(pcm[start:end])
    said = _read(self, "ingest")["text"]
    return _step(self, "transcribe", {"mode": "real", "text": text, "speech_s": round(speech_s, 3),
                                      "wer": round(phrasebook.word_error_rate(said, text), 4)})


@governed_task(bind=True, session=True, cleanup="keep", memory="64MiB", network=True,
               name="pipeline.translate")
def translate(self: Any, session_id: str, lang: str) -> dict[str, Any]:
    """Translates the transcript through the fake API with a cluster-wide rate limit (rmq.http);
    without ``RMQ_TRANSLATE_URL``, from the phrasebook locally (else unchanged)."""
    text = _read(self, "transcribe")["text"]
    url = os.environ.get("RMQ_TRANSLATE_URL")
    match = None
    if url:
        from rmq import http

        api = http.client("translate-api", base_url=url, rate=os.environ.get("RMQ_TRANSLATE_RATE", "5/s"),
                          concurrency=2)
        answer = api.post("/translate", json={"text": text[:2000], "target": lang}).json()
        translated, match = answer["translation"], answer.get("match")
    else:
        found = phrasebook.translate(text, lang)
        translated, match = found if found is not None else (text, None)
    return _step(self, "translate", {"lang": lang, "chars": len(translated), "text": translated, "match": match})


@governed_task(bind=True, session=True, cleanup="keep", memory="128MiB", name="pipeline.synthesize")
def synthesize(self: Any, session_id: str, lang: str) -> dict[str, Any]:
    """Speaks the translation with the language's voice (real), or 'speaks' with its synthetic voice
    model: the synthetic models outgrow the budget together."""
    if lang not in LANGUAGES:
        raise ValueError(f"no voice for language {lang!r}: the pipeline speaks {', '.join(LANGUAGES)}")
    text = _read(self, "translate")["text"]
    if not _real():
        with models.use(f"synthetic_tts_{lang}") as voice:
            checksum = voice.infer(len(text))
        data = os.urandom(len(text) * 64)
        (self.session_dir / "speech.raw").write_bytes(data)
        return _step(self, "synthesize", {"mode": "synthetic", "lang": lang, "bytes": len(data),
                                          "checksum": checksum})
    with models.use(f"tts_{lang}") as voice:
        pcm = voice.speak(text)
        rate = voice.sample_rate
    duration = audio.write_wav(self.session_dir / "speech.wav", pcm, rate)
    return _step(self, "synthesize", {"mode": "real", "lang": lang, "seconds": round(duration, 3)})


@governed_task(bind=True, session=True, cleanup="after_task", cpu=2, memory="128MiB",
               name="pipeline.encode")
def encode(self: Any, session_id: str, rounds: int = 40) -> dict[str, Any]:
    """Encodes the speech to Opus with an ``ffmpeg`` subprocess in the session directory, checks that
    the file decodes and measures it (real; kept in ``RMQ_PIPELINE_OUTPUT_DIR`` if set), or hashes
    the speech repeatedly (synthetic). The session is removed afterwards."""
    if not _real():
        data = (self.session_dir / "speech.raw").read_bytes()
        started = time.process_time()
        digest = b""
        for _ in range(rounds):
            digest = hashlib.sha256(data + digest).digest()
        (self.session_dir / "out.bin").write_bytes(digest)
        return {"step": "encode", "pid": os.getpid(), "mode": "synthetic",
                "cpu_s": round(time.process_time() - started, 3)}
    done = audio.encode("speech.wav", "speech.opus", cwd=self.session_dir)
    seconds = audio.decoded_seconds(done.path)
    kept = None  # without an output directory the file goes with the session directory
    out_dir = os.environ.get("RMQ_PIPELINE_OUTPUT_DIR")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kept = str(shutil.copy2(done.path, Path(out_dir) / f"{session_id}.opus"))
    return {"step": "encode", "pid": os.getpid(), "mode": "real", "file": kept, "format": "opus",
            "bytes": done.size_bytes, "seconds": round(seconds, 3), "encode_s": round(done.seconds, 3)}


@governed_task(memory="128MiB", name="pipeline.runaway")
def runaway(step_mib: int = 16, pause_s: float = 0.05, max_mib: int = 2048) -> None:
    """A bug that grows until the governor kills it: an ``ffmpeg`` subprocess that holds all it
    decodes, up to about ``max_mib`` (real; killed with its task, ``docs/design.md#task-trees``), or
    Python allocating ``step_mib`` every ``pause_s`` without bound (synthetic)."""
    if _real():
        subprocess.run(audio.runaway_encoder_cmd(max_mib * MiB), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        raise RuntimeError(f"the runaway encoder reached {max_mib} MiB and finished: nothing killed it")
    blocks = []
    while True:
        block = bytearray(step_mib * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(pause_s)


def pipeline(session_id: str, lang: str, seconds: int = 30, app: Any = None, text: str | None = None) -> Any:
    """The chain of one session (bound to ``app``, default the reference app); ``text`` is what the
    session says in real mode (default: a phrasebook sentence)."""
    from celery import chain

    from workers import app as reference

    tasks = (app or reference.app).tasks
    return chain(
        tasks["pipeline.ingest"].si(session_id=session_id, seconds=seconds, text=text),
        tasks["pipeline.transcribe"].si(session_id=session_id),
        tasks["pipeline.translate"].si(session_id=session_id, lang=lang),
        tasks["pipeline.synthesize"].si(session_id=session_id, lang=lang),
        tasks["pipeline.encode"].si(session_id=session_id),
    )
