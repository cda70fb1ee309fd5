"""Settings from the command line and the environment, and the seed's MultiModalConfig.

Every flag has an ``AUTOGLM_*`` environment variable (flag wins). No torch here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "assets" / "autoglm-phone-tiny"
SMALL_MODEL = "small"  # a random-weight small AutoGLM built locally (no download)


def default_model() -> str:
    return str(DEMO_MODEL) if (DEMO_MODEL / "config.json").exists() else SMALL_MODEL


@dataclass
class Settings:
    model: str = field(default_factory=default_model)
    quantize: str | None = None  # None = int4 with a GPU, fp32 without
    gpus: list | None = None
    gpu_memory: str | None = None
    attn_implementation: str = "sdpa"
    host: str = "127.0.0.1"
    port: int = 8000
    share: bool = False
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    allow_remote_images: bool = False
    max_queue: int = 16
    context_limit: int = 8192
    max_audio_seconds: float = 30.0
    # limits on what one request may carry (see README "Limits")
    max_upload_mb: float = 16.0  # one image or recording (decoded bytes; also the page's upload limit)
    max_body_mb: float = 25.0  # one API request body
    max_image_pixels: int = 40_000_000  # width x height of one image, checked before decoding the pixels
    max_images_per_turn: int = 8  # images in one user message
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call /v1; none by default
    trust_remote_code: bool = False  # let transformers run a checkpoint's own Python code (off unless asked)
    plan: bool = False
    model_config: str | None = None
    backend: str = "local"  # "local": the in-process engine; "openai": forward to --base-url
    base_url: str | None = None  # an OpenAI-compatible server (vLLM, SGLang), e.g. http://gpu-host:8000/v1
    remote_api_key: str | None = None  # the key that server wants
    asr_model: str | None = None  # Whisper hub id or directory: speech -> text for models that do not hear

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def _env(name: str, default=None):
    return os.environ.get(f"AUTOGLM_{name}", default)


def _bool(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def parse_gpus(value: str | None) -> list | None:
    """'0,1' -> [0, 1]; 'cuda:0,cpu' -> ['cuda:0', 'cpu']; '' or None -> None."""
    if not value:
        return None
    out: list = []
    for part in value.split(","):
        part = part.strip()
        out.append(int(part) if part.isdigit() else part)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="AutoGLM Studio: UI at /, OpenAI-compatible API at /v1")
    p.add_argument("--model", default=_env("MODEL", default_model()),
                   help="local directory or hub id; 'small' builds a random small AutoGLM (default: the shipped demo)")
    p.add_argument("--quantize", default=_env("QUANTIZE"), choices=["int4", "int8", "fp16", "bf16", "fp32"],
                   help="weight format (default: int4 with a GPU, fp32 on the CPU)")
    p.add_argument("--gpus", default=_env("GPUS"), help="GPU ids to shard across, e.g. 0,1")
    p.add_argument("--gpu-memory", default=_env("GPU_MEMORY"), help="per-GPU budget, e.g. 24GiB")
    p.add_argument("--attn-implementation", default=_env("ATTN", "sdpa"), choices=["sdpa", "eager"])
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000")))
    p.add_argument("--share", action="store_true", default=_bool(_env("SHARE", "0")),
                   help="also open a public Gradio share link (off by default)")
    p.add_argument("--served-model-name", action="append", dest="served_model_names",
                   default=[n for n in (_env("SERVED_MODEL_NAME") or "").split(",") if n],
                   help="a name the API answers to (repeatable)")
    p.add_argument("--api-key", default=_env("API_KEY") or None, help="require this Bearer key on /v1")
    p.add_argument("--allow-remote-images", action="store_true", default=_bool(_env("ALLOW_REMOTE_IMAGES", "0")),
                   help="let the API fetch http(s) image URLs")
    p.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", "16")))
    p.add_argument("--context-limit", type=int, default=int(_env("CONTEXT_LIMIT", "8192")))
    p.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", "30")),
                   help="longest recording accepted, in seconds")
    p.add_argument("--max-upload-mb", type=float, default=float(_env("MAX_UPLOAD_MB", "16")),
                   help="largest image or recording accepted, in MiB")
    p.add_argument("--max-body-mb", type=float, default=float(_env("MAX_BODY_MB", "25")),
                   help="largest API request body accepted, in MiB")
    p.add_argument("--max-image-pixels", type=int, default=int(_env("MAX_IMAGE_PIXELS", "40000000")),
                   help="most pixels (width x height) in one image")
    p.add_argument("--max-images-per-turn", type=int, default=int(_env("MAX_IMAGES_PER_TURN", "8")),
                   help="most images in one user message")
    p.add_argument("--cors-origins", default=_env("CORS_ORIGINS", ""),
                   help="comma-separated browser origins allowed to call the API cross-origin (default: none)")
    p.add_argument("--trust-remote-code", action="store_true", default=_bool(_env("TRUST_REMOTE_CODE", "0")),
                   help="let transformers run Python code shipped with a hub checkpoint (off by default)")
    p.add_argument("--backend", default=_env("BACKEND", "local"), choices=["local", "openai"],
                   help="local: load --model in this process; openai: forward to the server at --base-url "
                        "(focus and routing panels need local)")
    p.add_argument("--base-url", default=_env("BASE_URL"), help="OpenAI-compatible server for --backend openai")
    p.add_argument("--remote-api-key", default=_env("REMOTE_API_KEY"), help="API key for --base-url")
    p.add_argument("--asr-model", default=_env("ASR_MODEL"),
                   help="Whisper hub id or directory: transcribes recordings for models that do not hear audio")
    p.add_argument("--plan", action="store_true", help="print the device plan for --model-config and exit")
    p.add_argument("--model-config", default=None, help="config JSON for --plan (built on the meta device)")
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name in ("max_queue", "context_limit", "max_image_pixels", "max_images_per_turn"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_audio_seconds", "max_upload_mb", "max_body_mb"):
        if not getattr(a, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return Settings(
        model=a.model,
        quantize=a.quantize,
        gpus=parse_gpus(a.gpus),
        gpu_memory=a.gpu_memory,
        attn_implementation=a.attn_implementation,
        host=a.host,
        port=a.port,
        share=a.share,
        served_model_names=a.served_model_names,
        api_key=a.api_key,
        allow_remote_images=a.allow_remote_images,
        max_queue=a.max_queue,
        context_limit=a.context_limit,
        max_audio_seconds=a.max_audio_seconds,
        max_upload_mb=a.max_upload_mb,
        max_body_mb=a.max_body_mb,
        max_image_pixels=a.max_image_pixels,
        max_images_per_turn=a.max_images_per_turn,
        cors_origins=[o.strip() for o in (a.cors_origins or "").split(",") if o.strip()],
        trust_remote_code=a.trust_remote_code,
        plan=a.plan,
        model_config=a.model_config,
        backend=a.backend,
        base_url=a.base_url,
        remote_api_key=a.remote_api_key,
        asr_model=a.asr_model,
    )


# ----------------------------------------------------------------------------- the seed's public API

ENCODER_ALIASES = {"qwenaudio-lite": dict(num_mel_bins=80, audio_hidden_size=256, audio_layers=4, audio_heads=4),
                   "qwenaudio": dict(num_mel_bins=128, audio_hidden_size=1024, audio_layers=12, audio_heads=16)}
DECODER_ALIASES = {
    "glm-tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     moe_intermediate_size=128, num_experts=4),
    "glm-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      moe_intermediate_size=512, num_experts=8),
    "glm-4-9b": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                     moe_intermediate_size=1712, num_experts=8, vocab_size=151552, partial_rotary_factor=0.5),
}


@dataclass
class MultiModalConfig:
    """The seed API: ``MultiModalConfig(vision_encoder='vit-tiny', audio_encoder='qwenaudio-lite',
    text_decoder='glm-tiny', quantize='int4')``. Names map to AutoGLMConfig fields; ``overrides``
    sets any AutoGLMConfig field directly."""

    vision_encoder: str = "vit-tiny"
    audio_encoder: str = "qwenaudio-lite"
    text_decoder: str = "glm-tiny"
    quantize: str | None = None
    overrides: dict = field(default_factory=dict)

    def to_autoglm_kwargs(self) -> dict:
        if self.audio_encoder not in ENCODER_ALIASES:
            raise ValueError(f"unknown audio_encoder {self.audio_encoder!r}; choose from {sorted(ENCODER_ALIASES)}")
        if self.text_decoder not in DECODER_ALIASES:
            raise ValueError(f"unknown text_decoder {self.text_decoder!r}; choose from {sorted(DECODER_ALIASES)}")
        return {"vision_model": self.vision_encoder, **ENCODER_ALIASES[self.audio_encoder],
                **DECODER_ALIASES[self.text_decoder], **self.overrides}
