"""The real engines of the reference pipeline (the media extra): eSpeak NG voices, Silero VAD,
PocketSphinx and ffmpeg, each really run."""

from __future__ import annotations

import pytest

from workers import audio, pipeline
from workers.phrasebook import LANGUAGES, PHRASES, word_error_rate
from workers.speech import Recognizer, SpeechDetector, Voice, voice_name

pytestmark = pytest.mark.usefixtures("media")


@pytest.fixture(scope="module")
def english():
    voice = Voice(voice_name("en"))
    yield voice
    voice.unload()


def _tone(seconds: float, rate: int, hz: float = 440.0):
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 12000).astype(np.int16)


def test_every_phrasebook_sentence_survives_the_round_trip_through_speech(english):
    # Given the recogniser and detector the pipeline loads
    asr, vad = Recognizer(PHRASES), SpeechDetector()
    try:
        errors = {}
        for said in PHRASES:
            # When the sentence is spoken, resampled to 16 kHz, cut to its speech and recognised
            pcm = audio.resample(english.speak(said), english.sample_rate, 16000)
            start, end, speech_s = vad.speech(pcm)
            assert 0.5 < speech_s <= (end - start) / 16000, said
            errors[said] = word_error_rate(said, asr.transcribe(pcm[start:end]))
        # Then every sentence keeps most of its words (the demo's bar), and on average nearly all
        assert max(errors.values()) <= 0.4, errors
        assert sum(errors.values()) / len(errors) <= 0.1, errors
    finally:
        asr.unload()
        vad.unload()


def test_silence_has_no_speech():
    import numpy as np

    vad = SpeechDetector()
    assert vad.speech(np.zeros(16000, dtype=np.int16)) == (0, 0, 0.0)


def test_each_voice_is_its_own_engine_and_unloading_one_leaves_the_others(english):
    # Given the English voice's rendering of a sentence
    before = english.speak("please turn off the lights")
    # When every other voice is loaded, used and unloaded beside it
    for lang in LANGUAGES:
        other = Voice(voice_name(lang))
        assert len(other.speak(next(iter(PHRASES.values()))[lang])) > other.sample_rate  # over a second
        other.unload()
        with pytest.raises(RuntimeError, match="unloaded"):
            other.speak("nothing")
    # Then the English voice speaks as before: eSpeak's output varies by a few samples from one call to
    # the next, while one shared engine would now speak with the last voice (12 % longer in German)
    assert len(english.speak("please turn off the lights")) == pytest.approx(len(before), rel=0.01)


def test_an_unknown_voice_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no voice 'xx-nowhere'"):
        Voice("xx-nowhere")


def test_a_word_without_pronunciation_is_a_clear_error():
    with pytest.raises(ValueError, match="qwzxv"):
        Recognizer(["hello qwzxv"])


def test_resampling_keeps_duration_and_pitch():
    import numpy as np

    out = audio.resample(_tone(1.0, 22050), 22050, 16000)
    assert len(out) == 16000
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
    assert peak_hz == pytest.approx(440, abs=2)


def test_ffmpeg_encodes_opus_that_decodes_to_the_same_duration(tmp_path):
    seconds = audio.write_wav(tmp_path / "in.wav", _tone(1.5, 22050), 22050)
    pcm, rate = audio.read_wav(tmp_path / "in.wav")
    assert (rate, len(pcm)) == (22050, int(1.5 * 22050))
    done = audio.encode("in.wav", "out.opus", cwd=tmp_path)
    assert done.path == tmp_path / "out.opus" and done.size_bytes == done.path.stat().st_size > 0
    assert audio.decoded_seconds(done.path) == pytest.approx(seconds, abs=0.03)


def test_a_file_that_is_not_audio_is_reported_not_measured(tmp_path):
    bad = tmp_path / "bad.opus"
    bad.write_bytes(b"not audio at all" * 100)
    with pytest.raises(ValueError, match="not valid audio"):
        audio.decoded_seconds(bad)
    with pytest.raises(RuntimeError, match="ffmpeg exited"):
        audio.encode(bad, tmp_path / "out.opus")


def test_the_pipeline_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RMQ_PIPELINE_MODE", "synthetic")
    assert pipeline.mode() == "synthetic"
    monkeypatch.setenv("RMQ_PIPELINE_MODE", "Real")
    assert pipeline.mode() == "real"
    monkeypatch.delenv("RMQ_PIPELINE_MODE")
    assert pipeline.mode() == "real"  # the media extra is installed here
    monkeypatch.setenv("RMQ_PIPELINE_MODE", "fake")
    with pytest.raises(ValueError, match="RMQ_PIPELINE_MODE"):
        pipeline.mode()


def test_the_runaway_encoder_grows_to_its_bound_and_no_further():
    import subprocess
    import time

    import psutil

    # When the runaway ffmpeg runs with a 160 MiB bound and nobody kills it
    bound = 160 * 2**20
    proc = subprocess.Popen(audio.runaway_encoder_cmd(bound), stdin=subprocess.DEVNULL)
    peak, deadline = 0, time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        # Then it really grew, to about its bound, and finished there
        assert proc.wait(1) == 0
        assert 0.8 * bound < peak < 1.2 * bound, peak / 2**20
    finally:
        proc.kill()
        proc.wait()
