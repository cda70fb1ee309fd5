"""AutoGLMProcessor: chat template, tokenizer, image and speech preprocessing in one place.

``processor(text, images, audios)`` turns a rendered prompt with one ``<|image|>`` /
``<|audio|>`` placeholder per input into model inputs: each placeholder becomes
``<|begin_of_image|> <|image|> x (rows*cols) <|end_of_image|>`` (likewise for audio,
one token per 40 ms frame), and the result says where each image and recording sits
in the sequence and on what grid, which is what the focus probe needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .audio import log_mel

SPECIAL_TOKENS = [
    "<|pad|>",
    "<|bos|>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|image|>",
    "<|audio|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
]
THINK_TOKENS = ["<think>", "</think>"]

# One jinja template for every turn shape: strings or lists of text/image/audio parts.
# History assistant turns carry the answer only; with thinking off the prompt closes an
# empty think block so the model answers directly.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|{{ m.role }}|>{{ '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type in ['image', 'image_url'] -%}<|image|>"
    "{%- elif part.type in ['audio', 'input_audio'] -%}<|audio|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if m.role == 'assistant' -%}<|endoftext|>{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think></think>{%- endif -%}"
    "{%- endif -%}"
)

# The same turns with each user turn's text first, then its recordings, then its images. Under
# causal attention this lets the image's patch tokens read the question (typed or spoken) before
# the answer reads the patches, so "is this patch the shape being asked about?" can be worked out
# on the patches themselves. Images and recordings keep their relative order, so the processor
# pairs placeholders with media exactly as with CHAT_TEMPLATE.
CHAT_TEMPLATE_QUESTION_FIRST = (
    "{%- for m in messages -%}"
    "<|{{ m.role }}|>{{ '\\n' }}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}"
    "{%- for part in m.content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}"
    "{%- for part in m.content if part.type in ['audio', 'input_audio'] -%}<|audio|>{%- endfor -%}"
    "{%- for part in m.content if part.type in ['image', 'image_url'] -%}<|image|>{%- endfor -%}"
    "{%- endif -%}"
    "{%- if m.role == 'assistant' -%}<|endoftext|>{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think></think>{%- endif -%}"
    "{%- endif -%}"
)
CHAT_TEMPLATES = {"media-first": CHAT_TEMPLATE, "question-first": CHAT_TEMPLATE_QUESTION_FIRST}


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; any input (any language) stays encodable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class ImageSpan:
    """Where one image's patch tokens sit: [start, start + rows*cols) on a rows x cols grid."""

    start: int
    rows: int
    cols: int


@dataclass
class AudioSpan:
    """Where one recording's frames sit: [start, start + frames), each frame 40 ms."""

    start: int
    frames: int
    seconds_per_frame: float = 0.04


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, P, L, I;16, CMYK, ...) -> RGB, transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.max() > 0 else 1.0
        image = Image.fromarray((arr / hi * 255.0).astype(np.uint8), "L")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        span = max(arr.max() - arr.min(), 1e-9)
        image = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


class AutoGLMProcessor:
    """Tokenizer + image processor + speech front end of an AutoGLM model."""

    config_name = "processor_config.json"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        image_size: int = 224,
        patch_size: int = 16,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        num_mel_bins: int = 80,
        sample_rate: int = 16000,
        max_audio_seconds: float = 30.0,
    ):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.num_mel_bins = num_mel_bins
        self.sample_rate = sample_rate
        self.max_audio_seconds = max_audio_seconds
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids("<|image|>")
        self.audio_token_id = ids("<|audio|>")
        self.boi, self.eoi = ids("<|begin_of_image|>"), ids("<|end_of_image|>")
        self.boa, self.eoa = ids("<|begin_of_audio|>"), ids("<|end_of_audio|>")

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_config(cls, config, tokenizer: PreTrainedTokenizerFast) -> "AutoGLMProcessor":
        return cls(
            tokenizer,
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_mel_bins=config.num_mel_bins,
            sample_rate=config.sample_rate,
            max_audio_seconds=config.max_audio_seconds,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "AutoGLMProcessor":
        tokenizer = AutoTokenizer.from_pretrained(path)
        with open(os.path.join(path, cls.config_name)) as f:
            cfg = json.load(f)
        cfg.pop("processor_class", None)
        return cls(tokenizer, **cfg)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {
            "processor_class": "AutoGLMProcessor",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_mel_bins": self.num_mel_bins,
            "sample_rate": self.sample_rate,
            "max_audio_seconds": self.max_audio_seconds,
        }
        with open(os.path.join(path, self.config_name), "w") as f:
            json.dump(cfg, f, indent=2)

    # ------------------------------------------------------------------ text
    def apply_chat_template(self, messages: list[dict], enable_thinking: bool = True,
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    # ------------------------------------------------------------------ images and audio
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for image in images:
            rgb = to_rgb(image).resize((self.image_size, self.image_size), Image.BICUBIC)
            arr = np.asarray(rgb, dtype=np.float32) / 255.0
            arr = (arr - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        return torch.stack(out)

    def audio_features(self, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [log_mel(torch.as_tensor(np.asarray(a, dtype=np.float32)), self.num_mel_bins) for a in audios]
        lengths = torch.tensor([f.shape[-1] for f in feats])
        batch = torch.zeros(len(feats), self.num_mel_bins, int(lengths.max()))
        for i, f in enumerate(feats):
            batch[i, :, : f.shape[-1]] = f
        return batch, lengths

    @staticmethod
    def audio_frames(num_samples: int) -> int:
        frames = num_samples // 160 + 1
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames

    def __call__(self, text: str, images: list[Image.Image] | None = None,
                 audios: list[np.ndarray] | None = None) -> dict:
        images, audios = images or [], audios or []
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n_img = sum(1 for t in ids if t == self.image_token_id)
        n_aud = sum(1 for t in ids if t == self.audio_token_id)
        if n_img != len(images):
            raise ValueError(f"the prompt has {n_img} image placeholders but {len(images)} images were given")
        if n_aud != len(audios):
            raise ValueError(f"the prompt has {n_aud} audio placeholders but {len(audios)} recordings were given")
        rows, cols = self.grid
        expanded: list[int] = []
        image_spans: list[ImageSpan] = []
        audio_spans: list[AudioSpan] = []
        a = 0
        for t in ids:
            if t == self.image_token_id:
                expanded.append(self.boi)
                image_spans.append(ImageSpan(len(expanded), rows, cols))
                expanded.extend([self.image_token_id] * (rows * cols))
                expanded.append(self.eoi)
            elif t == self.audio_token_id:
                frames = self.audio_frames(len(audios[a]))
                a += 1
                expanded.append(self.boa)
                audio_spans.append(AudioSpan(len(expanded), frames))
                expanded.extend([self.audio_token_id] * frames)
                expanded.append(self.eoa)
            else:
                expanded.append(t)
        out = {
            "input_ids": torch.tensor([expanded]),
            "attention_mask": torch.ones(1, len(expanded), dtype=torch.long),
            "image_spans": image_spans,
            "audio_spans": audio_spans,
        }
        if images:
            out["pixel_values"] = self.pixel_values(images)
        if audios:
            out["audio_features"], out["audio_feature_lengths"] = self.audio_features(audios)
        return out
