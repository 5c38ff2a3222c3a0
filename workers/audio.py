"""Audio plumbing of the reference pipeline: WAV files, resampling, and ``ffmpeg`` as a subprocess.

The ``ffmpeg`` binary is the one the ``imageio-ffmpeg`` wheel ships (the ``media`` extra), so nothing
is needed from the system. That wheel has no ``ffprobe``: a file's duration is read by decoding it
completely with ``ffmpeg`` and counting the samples, which is also the check that it is valid audio.

Every ``ffmpeg`` here is a child of the calling process: in a governed task it belongs to the task's
process tree, so its memory counts against the task and it is killed with the task
(``docs/design.md#task-trees``).
"""

from __future__ import annotations

import os
import subprocess
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EncodeResult",
    "decoded_seconds",
    "encode",
    "ffmpeg_exe",
    "read_wav",
    "resample",
    "runaway_encoder_cmd",
    "write_wav",
]

#: sample rate that ``decoded_seconds`` decodes to (any rate works: it only counts samples)
_PROBE_RATE = 48000


def ffmpeg_exe() -> str:
    """Path of the ``ffmpeg`` binary of the ``imageio-ffmpeg`` wheel (``IMAGEIO_FFMPEG_EXE`` overrides it)."""
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def write_wav(path: str | os.PathLike[str], pcm: Any, rate: int) -> float:
    """Write mono 16-bit ``pcm`` (a numpy int16 array) as a WAV file; returns its duration in seconds."""
    import numpy as np

    samples = np.asarray(pcm, dtype=np.int16)
    with wave.open(os.fspath(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return len(samples) / rate


def read_wav(path: str | os.PathLike[str]) -> tuple[Any, int]:
    """A mono 16-bit WAV file as ``(numpy int16 array, sample rate)``.

    Raises:
        ValueError: the file is not mono 16-bit PCM.
    """
    import numpy as np

    with wave.open(os.fspath(path), "rb") as src:
        if src.getnchannels() != 1 or src.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono 16-bit PCM, got {src.getnchannels()} channel(s) "
                             f"of {8 * src.getsampwidth()} bits")
        return np.frombuffer(src.readframes(src.getnframes()), dtype=np.int16), src.getframerate()


def resample(pcm: Any, rate: int, new_rate: int) -> Any:
    """Band-limited resampling of int16 ``pcm`` from ``rate`` to ``new_rate`` Hz (one FFT, fine for
    the few seconds of one utterance): what lies above the new Nyquist frequency is cut, not folded
    back into the band the recogniser listens to."""
    import numpy as np

    if rate == new_rate or len(pcm) == 0:
        return np.asarray(pcm, dtype=np.int16)
    n = int(round(len(pcm) * new_rate / rate))
    spectrum = np.fft.rfft(np.asarray(pcm, dtype=np.float64))
    keep = min(len(spectrum), n // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n) * (n / len(pcm))
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class EncodeResult:
    """What one ``ffmpeg`` run produced: the file, its size and the run's wall time."""

    path: Path
    size_bytes: int
    seconds: float


def encode(src: str | os.PathLike[str], dst: str | os.PathLike[str], bitrate: str = "32k",
           cwd: str | os.PathLike[str] | None = None, timeout_s: float = 60.0) -> EncodeResult:
    """Encode ``src`` (any audio ffmpeg reads) to Opus in ``dst`` with an ``ffmpeg`` subprocess
    (relative paths are under ``cwd``).

    Raises:
        RuntimeError: ``ffmpeg`` failed (its last error lines are in the message) or timed out.
    """
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", os.fspath(src),
           "-c:a", "libopus", "-b:a", bitrate, os.fspath(dst)]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ffmpeg did not finish encoding {src} in {timeout_s:.0f}s") from None
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"ffmpeg exited with {done.returncode} encoding {src}: {' | '.join(tail)}")
    out = Path(dst) if os.path.isabs(dst) else Path(cwd or ".", dst)
    return EncodeResult(out, out.stat().st_size, time.monotonic() - t0)


def decoded_seconds(path: str | os.PathLike[str], timeout_s: float = 60.0) -> float:
    """The duration of an audio file, by decoding all of it with ``ffmpeg`` and counting samples.

    Raises:
        ValueError: ``ffmpeg`` cannot decode it, or it holds no audio.
    """
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", os.fspath(path),
           "-map", "0:a:0", "-f", "s16le", "-ac", "1", "-ar", str(_PROBE_RATE), "-"]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-2:]
        raise ValueError(f"{path} is not valid audio: ffmpeg exited with {done.returncode}: {' | '.join(tail)}")
    if not done.stdout:
        raise ValueError(f"{path} is not valid audio: no samples decoded")
    return len(done.stdout) / 2 / _PROBE_RATE


#: what ffmpeg 9's ``areverse`` holds per second of 48 kHz mono input, and what the job holds before
#: it (measured, RSS peaks: 87 MiB for 258 s of input, 371 MiB for 2071 s)
_AREVERSE_BYTES_PER_S = 164_000
_RUNAWAY_BASE_BYTES = 47 * 2**20


def runaway_encoder_cmd(max_bytes: int) -> list[str]:
    """An ``ffmpeg`` job that grows until it holds about ``max_bytes``: it reverses a generated tone,
    and ``areverse`` keeps every decoded frame in memory until the input ends (100-200 MB a second on
    an idle machine). The bound is there so that a governor that does not see it cannot take the
    machine down; past it, ffmpeg finishes."""
    seconds = max(1, (max_bytes - _RUNAWAY_BASE_BYTES) // _AREVERSE_BYTES_PER_S)
    source = f"sine=frequency=440:sample_rate=48000:duration={seconds}"
    return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", source,
            "-af", "areverse", "-f", "null", "-"]
