"""Spoken questions for ShapesWorld, synthesised with the ``espeak-ng`` CLI.

``synthesize`` runs ``espeak-ng`` (no shell) with a random voice, speed and
pitch, reads the WAV it writes to stdout with soundfile, resamples it with
torchaudio, and returns 16 kHz mono float32 audio in [-1, 1] with random level, light noise and
short leading/trailing silence.  All randomness comes from the given
``random.Random``, so the same rng state gives the same samples.

Only English questions are spoken.  ``VOICES_HELDOUT`` is disjoint from
``VOICES_TRAIN`` (different accents / variants) for a held-out speaker test.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
from fractions import Fraction
from functools import lru_cache

import numpy as np
import soundfile as sf

__all__ = [
    "VOICES_TRAIN",
    "VOICES_HELDOUT",
    "VOICES_TRAIN_WIDE",
    "SAMPLE_RATE",
    "espeak_available",
    "synthesize",
    "speak",
    "write_wav",
    "perturb",
    "read_wav",
]

SAMPLE_RATE = 16000

#: espeak-ng voices (``language[+variant]``) used for training data.
VOICES_TRAIN: list[str] = [
    "en-us",
    "en-gb",
    "en+m3",
    "en+f2",
    "en-us+f3",
    "en-gb-x-rp+m5",
    "en-029",
    "en-gb-x-gbclan",
]
#: Voices never used for training (accents and variants absent from VOICES_TRAIN).
VOICES_HELDOUT: list[str] = [
    "en-gb-scotland",
    "en-us-nyc+f4",
    "en+klatt",
]
#: A wider training set for speaker generalisation: VOICES_TRAIN plus more of espeak-ng's
#: formant variants (male m1-m7, female f1/f5) on the training accents. It still shares no
#: accent or variant with VOICES_HELDOUT (no scotland/nyc accent, no f4, no klatt).
VOICES_TRAIN_WIDE: list[str] = VOICES_TRAIN + [
    "en+m1",
    "en+m6",
    "en+f1",
    "en-us+m4",
    "en-us+f5",
    "en-gb+m2",
    "en-gb+m7",
    "en-029+f1",
    "en-gb-x-gbcwmd",
    "en-gb-x-gbclan+m7",
]

SPEED_WPM = (140, 200)
PITCH = (30, 70)
SNR_DB = (20.0, 40.0)
GAIN = (0.3, 1.0)
SILENCE_S = (0.05, 0.3)


@lru_cache(maxsize=1)
def _espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def espeak_available() -> bool:
    """True if the ``espeak-ng`` executable is on PATH."""
    return _espeak_path() is not None


def _decode_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV bytes (espeak-ng streams them with placeholder sizes) to mono float32 and its rate."""
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0], rate


def _resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited (windowed-sinc) resampling of mono float audio from ``src_rate`` to ``dst_rate`` Hz."""
    import torch
    import torchaudio.functional as AF

    if src_rate == dst_rate or audio.size == 0:
        return audio.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return AF.resample(x, int(src_rate), int(dst_rate)).numpy()


# torchaudio resamples between integer rates (its kernel has one phase per output sample of a
# period), so a fractional speed factor becomes the nearest fraction p/q with q <= this bound:
# within 1e-4 of the drawn factor for factors near 1, and a kernel of a few hundred phases at most.
SPEED_DENOMINATOR = 200


def _espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    exe = _espeak_path()
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    text = " ".join(text.split())
    if text.startswith("-"):  # never let the text be parsed as an option
        text = " " + text
    proc = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True, check=True, timeout=60,
    )
    return _decode_wav_bytes(proc.stdout)


def synthesize(text: str, rng: random.Random, voices: list[str],
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speak ``text`` with a random voice from ``voices``; return mono float32 audio.

    Random speed (140-200 wpm), pitch (30-70), gain (0.3-1.0), white noise at
    20-40 dB SNR and 0.05-0.3 s of leading/trailing silence.  Deterministic
    given the state of ``rng``.
    """
    if not voices:
        raise ValueError("voices must not be empty")
    return speak(text, rng, rng.choice(voices), sample_rate)


def speak(text: str, rng: random.Random, voice: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``synthesize`` with the voice given: the same draws from ``rng`` after the voice's."""
    speed = rng.randint(*SPEED_WPM)
    pitch = rng.randint(*PITCH)
    gain = rng.uniform(*GAIN)
    snr_db = rng.uniform(*SNR_DB)
    lead = rng.uniform(*SILENCE_S)
    trail = rng.uniform(*SILENCE_S)
    noise_seed = rng.getrandbits(32)

    speech, rate = _espeak(text, voice, speed, pitch)
    speech = _resample(speech, rate, sample_rate)
    peak = float(np.max(np.abs(speech))) if speech.size else 0.0
    if peak > 0:
        speech = speech * (gain / peak)
    audio = np.concatenate([
        np.zeros(int(lead * sample_rate), np.float32),
        speech.astype(np.float32),
        np.zeros(int(trail * sample_rate), np.float32),
    ])
    voiced = speech[np.abs(speech) > 0.02 * gain] if peak > 0 else speech
    sig_rms = float(np.sqrt(np.mean(voiced ** 2))) if voiced.size else 1e-3
    noise_rms = sig_rms / (10.0 ** (snr_db / 20.0))
    noise = np.random.default_rng(noise_seed).normal(0.0, noise_rms, audio.shape)
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


EQ_BANDS_HZ = (150.0, 400.0, 1000.0, 2500.0, 6000.0)


def perturb(audio: np.ndarray, rng: random.Random, speed: float = 0.12, tilt: float = 0.7,
            eq_db: float = 0.0) -> np.ndarray:
    """Training-only speaker augmentation of a synthesised question.

    Speed perturbation: resample by a factor in [1 - speed, 1 + speed] (tempo, pitch and formants
    move together, as for a shorter or longer vocal tract). Spectral tilt: a first-order filter
    ``y[t] = x[t] - a x[t-1]`` with ``a`` in [-tilt, tilt] (brighter or duller timbre). With
    ``eq_db`` > 0, a random equaliser: a gain in [-eq_db, eq_db] dB at each of ``EQ_BANDS_HZ``,
    interpolated over log frequency (a different vocal tract / channel colour). Then the peak
    level is restored. Deterministic given the state of ``rng``.
    """
    factor = rng.uniform(1.0 - speed, 1.0 + speed)
    a = rng.uniform(-tilt, tilt)
    gains_db = [rng.uniform(-eq_db, eq_db) for _ in EQ_BANDS_HZ] if eq_db > 0 else None
    x = np.asarray(audio, dtype=np.float32)
    if x.size < 2:
        return x
    ratio = Fraction(factor).limit_denominator(SPEED_DENOMINATOR)  # factor input samples per output sample
    x = _resample(x, ratio.numerator, ratio.denominator)
    y = x.copy()
    y[1:] -= a * x[:-1]
    if gains_db is not None:
        spec = np.fft.rfft(y)
        freqs = np.fft.rfftfreq(y.size, 1.0 / SAMPLE_RATE)
        curve = np.interp(np.log(np.maximum(freqs, 1.0)), np.log(EQ_BANDS_HZ), gains_db)
        y = np.fft.irfft(spec * 10.0 ** (curve / 20.0), n=y.size)
    peak_in, peak_out = float(np.abs(x).max()), float(np.abs(y).max())
    if peak_out > 0:
        y *= peak_in / peak_out
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | os.PathLike[str], audio: np.ndarray,
              sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0) * 32767.0).round().astype(np.int16)
    sf.write(os.fspath(path), pcm, sample_rate, subtype="PCM_16", format="WAV")  # int16 in: written as is


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a WAV file as mono float32 in [-1, 1]; returns ``(audio, rate)``."""
    with open(path, "rb") as f:
        return _decode_wav_bytes(f.read())
