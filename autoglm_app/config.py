"""Settings and Limits, declared once.

Every field below is one setting: its default, its help text and its ``AUTOGLM_*`` environment
variable are in its declaration, and the command line (``build_parser``), the environment and the
README's flag table (``flag_table``) are generated from it, so no default is written twice. The
flag wins over the environment, which wins over the default. ``Limits`` are what one request may
carry and what the server holds; the same ``Limits`` object reaches every backend (the in-process
engine, the remote engine, the speech-to-text model), the API and the page. No torch here.
"""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the checkout's assets/ (a source or editable install); an installed copy of the package looks in the
# working directory instead, so `pip install .` then `autoglm-studio` in the checkout serves the demo
ASSETS = ROOT / "assets" if (ROOT / "assets").is_dir() else Path.cwd() / "assets"
DEMO_MODEL = ASSETS / "autoglm-phone-tiny"
SMALL_MODEL = "small"  # a random-weight small AutoGLM built locally (no download)
QUANTIZE_CHOICES = ("int4", "int8", "fp16", "bf16", "fp32")
DEFAULT_MODEL_NAME = "autoglm-phone-9b"  # a name the API always answers to unless --served-model-name is given
ENV_PREFIX = "AUTOGLM_"


def default_model() -> str:
    return str(DEMO_MODEL) if (DEMO_MODEL / "config.json").exists() else SMALL_MODEL


def setting(default=MISSING, help: str = "", *, env: str | None = "", flag: bool = True, choices=None,
            metavar: str | None = None, minimum: float | None = None, positive: bool = False,
            repeat: bool = False, default_factory=MISSING, shown_default: str | None = None):
    """A dataclass field that is also a command-line flag and an environment variable.

    env: the variable's name after ``AUTOGLM_`` ("" = the flag's name in capitals, None = no variable);
    flag: False for a limit with no flag (a documented constant); repeat: a list flag given once per
    item (its variable holds them comma-separated); other lists take one comma-separated value.
    """
    meta = dict(help=help, env=env, flag=flag, choices=choices, metavar=metavar, minimum=minimum,
                positive=positive, repeat=repeat, shown_default=shown_default)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and how much the server holds at once."""

    max_queue: int = setting(16, "requests allowed to wait before the server answers busy", minimum=1)
    context_limit: int = setting(8192, "prompt + new tokens of one request, in tokens", minimum=1)
    max_audio_seconds: float = setting(30.0, "longest recording accepted, in seconds", positive=True)
    max_upload_mb: float = setting(16.0, "largest image or recording accepted, in MiB (decoded bytes; also the "
                                         "page's upload limit)", positive=True)
    max_body_mb: float = setting(25.0, "largest API request body accepted, in MiB", positive=True)
    max_image_pixels: int = setting(40_000_000, "most pixels (width x height) in one image, checked before "
                                                "decoding", minimum=1)
    max_images_per_turn: int = setting(8, "most images in one user message", minimum=1)
    max_stop_strings: int = setting(16, "stop strings in one request (1,000 characters each)", flag=False)
    max_sessions: int = setting(1024, "sessions whose recurrent memory and turn order are remembered "
                                      "(least recently used dropped)", flag=False)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass
class Settings:
    model: str = setting(help="local directory or hub id; 'small' builds a random small AutoGLM; 'random:PATH' "
                              "builds the architecture of a config JSON at its full size with random weights",
                         default_factory=default_model, shown_default="`assets/autoglm-phone-tiny` (or `small` "
                                                                       "where it is missing)")
    random_seed: int = setting(0, "seed of a random: model's weights (the same seed gives the same weights)",
                               minimum=0)
    quantize: str | None = setting(None, "weight format", choices=QUANTIZE_CHOICES,
                                   shown_default="`int4` with a GPU, `fp32` on the CPU")
    compare_model: str | None = setting(None, "compare mode: a second checkpoint (local directory or hub id) that "
                                              "answers every page turn too, shown side by side with the metrics "
                                              "(it must share the tokenizer for the teacher-forced ones)",
                                        metavar="PATH", shown_default="none")
    compare_quantize: str | None = setting(None, "compare mode: load the model (or --compare-model) a second time "
                                                 "in this format, e.g. int4 served against fp32",
                                           choices=QUANTIZE_CHOICES, shown_default="none (with only --compare-model: "
                                                                                   "the --quantize format)")
    gpus: list | None = setting(None, "GPUs to shard across, e.g. 0,1 (or cuda:0,cpu)", metavar="0,1",
                                shown_default="all on one device")
    gpu_memory: str | None = setting(None, "per-GPU budget, e.g. 24GiB", metavar="24GiB",
                                     shown_default="what each GPU has")
    attn_implementation: str = setting("sdpa", "attention kernel (focus uses a one-row probe beside sdpa)",
                                       env="ATTN", choices=("sdpa", "eager"))
    cpu_threads: int = setting(0, "torch threads for a model on the CPU; 0 = the cores less one (left to the "
                                  "web server: measured on 2 cores, two threads doubled the CPU per token)",
                               minimum=0)
    compile: str = setting("auto", "compile the decode step with torch.compile (auto: on for a model with "
                                   "plain 16/32-bit weights, where it was measured to pay)",
                           choices=("auto", "on", "off"))
    max_batch: int = setting(0, "requests decoded together (continuous batching); 0 = up to 8, as the KV "
                                "cache fits in a quarter of the free memory", minimum=0)
    engine_process: str = setting("off", "run the engine (model, queue, worker, probes) in a child process with its "
                                         "own interpreter, its events sent over a pipe, so the web server's Python "
                                         "does not hold up the decoding; on 2 cores it sped one stream up and slowed "
                                         "8 concurrent ones (docs/PERFORMANCE.md); not with compare mode",
                                  choices=("on", "off"))
    trace_memory_mb: float = setting(512.0, "memory for the per-layer focus detail the page keeps for review and "
                                            "export, server-wide, in MiB (one session up to a quarter of it); the "
                                            "oldest turns' per-layer detail goes first, every token's shown maps "
                                            "stay", positive=True)
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port for the page and the API", minimum=1)
    share: bool = setting(False, "also open a public Gradio share link")
    served_model_names: list[str] = setting(help="a name the API answers to (repeatable)", repeat=True,
                                            default_factory=list, metavar="NAME",
                                            shown_default=f"the model id and `{DEFAULT_MODEL_NAME}`")
    api_key: str | None = setting(None, "require this Bearer key on /v1", shown_default="none: any key accepted")
    allow_remote_images: bool = setting(False, "let the API fetch http(s) image URLs")
    cors_origins: list[str] = setting(help="browser origins allowed to call /v1 cross-origin, comma-separated",
                                      default_factory=list, metavar="ORIGINS", shown_default="none")
    trust_remote_code: bool = setting(False, "let transformers run Python code shipped with a hub checkpoint")
    backend: str = setting("local", "local: load --model in this process; openai: forward to --base-url "
                                    "(focus and routing need local)", choices=("local", "openai"))
    base_url: str | None = setting(None, "OpenAI-compatible server for --backend openai (vLLM, SGLang)",
                                   metavar="URL", shown_default="none")
    remote_api_key: str | None = setting(None, "API key for --base-url", shown_default="none")
    asr_model: str | None = setting(None, "Whisper hub id or directory: transcribes recordings for models "
                                          "that do not hear", shown_default="none")
    plan: bool = setting(False, "print the device plan for --model-config and exit", env=None)
    model_config: str | None = setting(None, "config JSON for --plan (built on the meta device)", env=None,
                                       metavar="PATH", shown_default="none")
    limits: Limits = field(default_factory=Limits)


# ----------------------------------------------------------------------------- parsing


def _bool(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def normalize_device_text(text: str) -> int | str:
    """'0' / 'cuda' / 'cuda:1' -> 0 / 0 / 1; 'cpu', 'mps', 'xpu:0' kept (what accelerate's device maps take)."""
    t = str(text).strip().lower()
    if t.isdigit():
        return int(t)
    if t == "cuda":
        return 0
    if t.startswith("cuda:") and t[5:].isdigit():
        return int(t[5:])
    if t in ("cpu", "mps", "disk") or re.fullmatch(r"(xpu|npu|mps):\d+", t):
        return t
    raise ValueError(f"unknown device {text!r}: use a GPU index (0), 'cuda:0' or 'cpu'")


def parse_gpus(value: str | None) -> list | None:
    """'0,1' -> [0, 1]; 'cuda:0, cpu' -> [0, 'cpu']; '' or None -> None. The one --gpus parser."""
    items = _csv(value)
    return [normalize_device_text(item) for item in items] or None


def _flag(f) -> str:
    return "--" + f.name.replace("_", "-").removesuffix("s" if f.metadata["repeat"] else "")


def _env_name(f) -> str | None:
    env = f.metadata["env"]
    return None if env is None else ENV_PREFIX + (env or f.name.upper()).removesuffix(
        "S" if f.metadata["repeat"] and not env else "")


def _base_type(f):
    hint = typing.get_type_hints(Limits if f.name in _LIMIT_NAMES else Settings)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _declared(f):
    return f.default_factory() if f.default is MISSING else f.default


def _flag_fields():
    return [f for f in (*fields(Settings), *fields(Limits)) if f.name != "limits" and f.metadata["flag"]]


_LIMIT_NAMES = {f.name for f in fields(Limits)}


def _convert(f, text: str):
    kind = _base_type(f)
    if kind is list:
        return parse_gpus(text) if f.name == "gpus" else _csv(text)
    if kind is bool:
        return _bool(text)
    return kind(text)


def build_parser(environ: dict | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="autoglm-studio",
                                description="AutoGLM Studio: the page at /, an OpenAI-compatible API at /v1")
    for f in _flag_fields():
        m, kind = f.metadata, _base_type(f)
        env = _env_name(f)
        default = _declared(f)
        if env and env in environ:
            try:
                default = _csv(environ[env]) if m["repeat"] else _convert(f, environ[env])
            except ValueError as e:
                p.error(f"{env}={environ[env]!r} is not a valid {_flag(f)}: {e}")
        help_text = m["help"] + (f" [{env}]" if env else "")
        kw = dict(dest=f.name, default=default, help=help_text)
        if kind is bool:
            p.add_argument(_flag(f), action="store_true", **kw)
        elif m["repeat"]:
            p.add_argument(_flag(f), action="append", metavar=m["metavar"], **kw)
        else:
            conv = (lambda f: lambda text: _convert(f, text))(f)
            p.add_argument(_flag(f), type=conv, choices=m["choices"], metavar=m["metavar"], **kw)
    return p


def parse_settings(argv: list[str] | None = None, environ: dict | None = None) -> Settings:
    parser = build_parser(environ)
    a = parser.parse_args(argv)
    for f in _flag_fields():
        value = getattr(a, f.name)
        if f.metadata["minimum"] is not None and value < f.metadata["minimum"]:
            parser.error(f"{_flag(f)} must be at least {f.metadata['minimum']}")
        if f.metadata["positive"] and not value > 0:
            parser.error(f"{_flag(f)} must be positive")
    if a.served_model_names and any(not n for n in a.served_model_names):
        parser.error("--served-model-name must not be empty")
    limits = Limits(**{f.name: getattr(a, f.name) for f in _flag_fields() if f.name in _LIMIT_NAMES})
    return Settings(**{f.name: getattr(a, f.name) for f in _flag_fields() if f.name not in _LIMIT_NAMES},
                    limits=limits)


def flag_table() -> str:
    """The README's table of flags, variables and defaults, from the declaration above."""
    rows = ["| flag | env | default | what |", "|---|---|---|---|"]
    for f in _flag_fields():
        m = f.metadata
        name = _flag(f) + (" " + "\\|".join(m["choices"]) if m["choices"] else "")
        env = _env_name(f)
        shown = m["shown_default"]
        if shown is None:
            value = _declared(f)
            shown = ("off" if value is False else f"`{value:,}`" if isinstance(value, int) and value >= 10**5
                     else f"`{value:g}`" if isinstance(value, float) else f"`{value}`")
        rows.append(f"| `{name}` | {f'`{env}`' if env else ''} | {shown} | {m['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flag_table())
