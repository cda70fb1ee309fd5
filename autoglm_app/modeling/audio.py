"""Speech front end: Whisper/Qwen-Audio style log-mel features with torchaudio.

16 kHz mono in, 25 ms Hann window (400 samples), 10 ms hop (160 samples),
80 or 128 Slaney mel bins, log10 with an 8-decade dynamic range, scaled to
roughly [-1, 1] the way Whisper does.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torchaudio

SAMPLE_RATE = 16000
WINDOW = 400
HOP = 160


@lru_cache(maxsize=4)
def _mel(num_mel_bins: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=WINDOW,
        win_length=WINDOW,
        hop_length=HOP,
        n_mels=num_mel_bins,
        power=2.0,
        norm="slaney",
        mel_scale="slaney",
        center=True,
    )


def log_mel(waveform: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """(samples,) float waveform at 16 kHz -> (num_mel_bins, samples // 160 + 1) features."""
    if waveform.dim() != 1:
        raise ValueError(f"expected a mono waveform of shape (samples,), got {tuple(waveform.shape)}")
    with torch.no_grad():
        spec = _mel(num_mel_bins)(waveform.float().cpu())
        spec = torch.clamp(spec, min=1e-10).log10()
        spec = torch.maximum(spec, spec.max() - 8.0)
        return (spec + 4.0) / 4.0
