"""Speech to text for models that do not hear: a Whisper model through transformers.

``Transcriber(name_or_path)`` loads a Whisper checkpoint (hub id through the HF cache with the usual
offline switches, or a local directory) and ``transcribe(audio)`` turns a recording (any rate or
channel layout, as the engine accepts it) into text. ``--asr-model`` enables it: the UI shows the
transcript for editing before it is sent, and the API sends the transcript in place of
``input_audio`` to a model that has no audio tower.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ..config import Limits
from ..events import Audio
from .inputs import to_mono_16k

log = logging.getLogger(__name__)


class Transcriber:
    def __init__(self, name_or_path: str, limits: Limits | None = None, device: str | None = None,
                 max_new_tokens: int = 200, language: str | None = None):
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        from ..loading.checkpoints import resolve_checkpoint

        path = resolve_checkpoint(name_or_path)
        self.device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.name = str(name_or_path)
        self.max_seconds = (limits or Limits()).max_audio_seconds  # the server's --max-audio-seconds
        self.max_new_tokens = max_new_tokens
        self.language = language
        self._lock = threading.Lock()  # one transcription at a time: the UI and API threads share it
        log.info("speech-to-text model %s on %s", self.name, self.device)

    @torch.inference_mode()
    def transcribe(self, audio: Audio | np.ndarray) -> str:
        """A recording (Audio, or 16 kHz mono float samples) -> its text."""
        if not isinstance(audio, Audio):
            audio = Audio(np.asarray(audio), 16000)
        samples = to_mono_16k(audio, self.max_seconds)
        # Whisper hears one window (30 s) at a time: a longer recording (--max-audio-seconds 60) is cut
        # into windows, transcribed as one batch, and the texts joined
        window = int(self.processor.feature_extractor.n_samples)
        chunks = [samples[i : i + window] for i in range(0, len(samples), window)] or [samples]
        features = self.processor.feature_extractor(chunks, sampling_rate=16000, return_tensors="pt")
        inputs = features["input_features"].to(self.device, self.model.dtype)
        kwargs = {"language": self.language, "task": "transcribe"} if self.language else {}
        with self._lock:
            ids = self.model.generate(inputs, max_new_tokens=self.max_new_tokens, **kwargs)
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return " ".join(t.strip() for t in texts if t.strip())
