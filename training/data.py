"""Training and evaluation samples for AutoGLM-Phone-Tiny, drawn from ShapesWorld.

A sample is one user turn (image and/or text or a spoken question) and the assistant
target: ``<think>trace</think>answer`` with thinking on, the answer alone with
thinking off (the chat template then closes an empty think block in the prompt).
``collate`` turns samples into a padded batch whose labels cover the target only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import speech
from .shapesworld import COLORS, QA, SHAPES, TASKS, make_qa, random_scene, render

IMAGE_SIZES = (128, 160, 192, 224, 256)


@dataclass
class Sample:
    messages: list[dict]  # chat-template messages for the user turn
    images: list[Image.Image]
    audios: list[np.ndarray]
    thinking: bool
    target: str  # what the assistant must write after the prompt
    qa: QA
    scene: object
    spoken: bool


def corpus(n: int = 4000, seed: int = 1234) -> list[str]:
    """Every kind of text the model will read or write, for training the tokenizer."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        qa = make_qa(random_scene(rng, 128), rng)
        texts += [qa.question, qa.thinking, qa.answer]
    texts += [" ".join(COLORS), " ".join(SHAPES), "Describe the image.", "<think></think>"]
    return texts


def make_sample(rng: random.Random, spoken_p: float = 0.25, thinking_p: float = 0.6,
                voices: list[str] | None = None, task: str | None = None, spoken: bool | None = None,
                thinking: bool | None = None, task_weights: tuple[float, ...] | None = None,
                perturb_speech: bool = False, eq_db: float = 0.0) -> Sample:
    scene = random_scene(rng, rng.choice(IMAGE_SIZES))
    if task is None and task_weights is not None:
        task = rng.choices(TASKS, weights=task_weights)[0]
    qa = make_qa(scene, rng, task)
    image = render(scene)
    zh = qa.lang == "zh"
    use_image = qa.task != "identity" or rng.random() < 0.5
    if spoken is None:
        spoken = (not zh) and speech.espeak_available() and rng.random() < spoken_p
    if thinking is None:
        thinking = rng.random() < thinking_p
    parts, images, audios = [], [], []
    if use_image:
        parts.append({"type": "image"})
        images.append(image)
    if spoken:
        parts.append({"type": "audio"})
        audio = speech.synthesize(qa.question, rng, voices or speech.VOICES_TRAIN)
        audios.append(speech.perturb(audio, rng, eq_db=eq_db) if perturb_speech else audio)
    else:
        parts.append({"type": "text", "text": qa.question})
    target = (f"<think>{qa.thinking}</think>{qa.answer}" if thinking else qa.answer) + "<|endoftext|>"
    return Sample([{"role": "user", "content": parts}], images, audios, thinking, target, qa, scene, spoken)


def encode(processor, sample: Sample, mask_rng: random.Random | None = None) -> dict:
    """Token ids, labels and encoder inputs of a sample; with ``mask_rng``, its recording's
    features are masked by ``mask_features`` (training-only augmentation)."""
    prompt = processor.apply_chat_template(sample.messages, enable_thinking=sample.thinking)
    enc = processor(prompt, images=sample.images, audios=sample.audios)
    tok = processor.tokenizer(sample.target, add_special_tokens=False, return_offsets_mapping=True)
    target = tok["input_ids"]
    ids = enc["input_ids"][0].tolist()
    features = enc.get("audio_features")
    if features is not None and mask_rng is not None:  # the processor's own fresh tensor: masked in place
        for f, n in zip(features, enc["audio_feature_lengths"].tolist()):
            f[:, :n] = mask_features(f[:, :n], mask_rng)
    return {
        "prompt_len": len(ids),
        "target_offsets": [tuple(o) for o in tok["offset_mapping"]],
        "input_ids": ids + target,
        "labels": [-100] * len(ids) + target,
        "pixel_values": enc.get("pixel_values"),
        "audio_features": features,
        "audio_feature_lengths": enc.get("audio_feature_lengths"),
    }


def mask_features(features: torch.Tensor, rng: random.Random, freq_masks: int = 2, freq_width: int = 10,
                  time_masks: int = 2, time_width: int = 8) -> torch.Tensor:
    """Training-only masking of one recording's log-mel features ``(mel bins, frames)``
    (SpecAugment-style): up to ``freq_masks`` bands of 0..``freq_width`` mel bins and up to
    ``time_masks`` spans of 0..``time_width`` frames (10 ms each) are set to the recording's mean,
    so no single band or instant carries a word alone. Returns a new tensor; deterministic given
    the state of ``rng``."""
    out = features.clone()
    bins, frames = out.shape
    fill = float(out.mean())
    for _ in range(freq_masks):
        width = rng.randint(0, min(freq_width, bins))
        start = rng.randint(0, bins - width)
        out[start:start + width, :] = fill
    for _ in range(time_masks):
        width = rng.randint(0, min(time_width, frames))
        start = rng.randint(0, frames - width)
        out[:, start:start + width] = fill
    return out


def collate(encoded: list[dict], pad_id: int) -> dict:
    T = max(len(e["input_ids"]) for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    pixels = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    feats = [(e["audio_features"], e["audio_feature_lengths"]) for e in encoded if e["audio_features"] is not None]
    if feats:
        Tm = max(f.shape[-1] for f, _ in feats)
        batch["audio_features"] = torch.cat(
            [torch.nn.functional.pad(f, (0, Tm - f.shape[-1])) for f, _ in feats])
        batch["audio_feature_lengths"] = torch.cat([n for _, n in feats])
    return batch


__all__ = ["Sample", "TASKS", "collate", "corpus", "encode", "make_sample", "mask_features"]
