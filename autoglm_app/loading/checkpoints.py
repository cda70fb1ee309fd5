"""Loading an AutoGLM checkpoint: quantization (INT4 NF4 mixed with 16-bit), device placement, processor.

``load_model`` takes a local directory or a hub id (resolved through the usual HF
cache; ``HF_HUB_OFFLINE=1`` is honoured and a missing model gives an error that says
what to do), quantizes the decoder's projections and experts with bitsandbytes
while the encoders, adapter, router gates, embeddings and output head stay 16-bit
(``KEEP_16BIT``), places the model on the GPUs with a plan from ``planning`` (or on
the CPU when there is none), and proves afterwards that every projection that should
be 4-bit is.

The 16-bit dtype is float16 on GPUs *and* on the CPU: bitsandbytes' 4-bit CPU
kernels run in float16, and on the small test model float16 compute matched fp32
logits to 1.5e-3 relative L2 where bfloat16 was off by 1.4e-2 (its 8-bit mantissa),
at about the same speed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .planning import KEEP_16BIT, Plan, is_kept_16bit, normalize_device, parse_memory, plan_device_map

logger = logging.getLogger(__name__)

__all__ = [
    "KEEP_16BIT",
    "QUANTIZE_CHOICES",
    "LoadedModel",
    "ModelNotFoundError",
    "QuantizationError",
    "UnsafeCheckpointError",
    "compute_dtype",
    "default_quantize",
    "keep_16bit_patterns",
    "load_model",
    "quantization_config",
    "require_safetensors",
    "resolve_checkpoint",
    "verify_quantized",
]

QUANTIZE_CHOICES = ("int4", "int8", "fp16", "bf16", "fp32")

PLAIN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Decoder projections that must be quantized (every layer's attention, every expert).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint is neither a local directory nor reachable / cached on the hub."""


class QuantizationError(RuntimeError):
    """A projection that should be quantized was loaded in full precision."""


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    model_id: str
    quantize: str
    device_map: dict | None
    plan: Plan | None


# ----------------------------------------------------------------------------- quantization


def default_quantize() -> str:
    """int4 on a GPU; fp32 on the CPU (the accurate choice where memory is rarely the limit)."""
    return "int4" if torch.cuda.is_available() else "fp32"


def compute_dtype(on_gpu: bool | None = None) -> torch.dtype:
    """The 16-bit dtype for kept modules and 4-bit compute: float16 on GPU and CPU (see module docstring)."""
    return torch.float16


def keep_16bit_patterns(names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """KEEP_16BIT as transformers 5 skip patterns.

    transformers matches ``llm_int8_skip_modules`` from the start of a module's full
    name or as a suffix, so a bare 'router' would miss 'model.layers.0.mlp.router.classifier'
    and 'vision_tower' would miss 'model.vision_tower.vit...'. The pattern
    ``(?:.*\\.)?router`` matches the component anywhere, at a module boundary.
    """
    return [rf"(?:.*\.)?{name}" for name in (KEEP_16BIT if names is None else names)]


def quantization_config(quantize: str, on_gpu: bool | None = None, keep_16bit: list[str] | tuple | None = None):
    """BitsAndBytesConfig for int4 (NF4, double quantization) or int8 (LLM.int8); None otherwise."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(on_gpu),
            llm_int8_skip_modules=keep_16bit_patterns(keep_16bit),
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_16bit_patterns(keep_16bit))
    return None


def model_dtype(quantize: str, on_gpu: bool | None = None) -> torch.dtype:
    return compute_dtype(on_gpu) if quantize in ("int4", "int8") else PLAIN_DTYPES[quantize]


def verify_quantized(model: nn.Module, quantize: str, family=None) -> int:
    """Raise QuantizationError unless every decoder projection and expert projection is quantized.

    For a transformers-native family (``family.layers_path``) every nn.Linear inside the decoder
    layers outside the family's 16-bit modules must be quantized, and no fused 3-D expert tensor
    may be left.

    Returns the number of quantized layers checked. A full-precision projection here would be a
    silent memory regression (a 9B model would no longer fit its GPUs).
    """
    if quantize not in ("int4", "int8"):
        return 0
    import bitsandbytes as bnb

    expected = bnb.nn.Linear4bit if quantize == "int4" else bnb.nn.Linear8bitLt
    layers_path = getattr(family, "layers_path", None)
    targets = _hf_targets(model, family) if layers_path else _autoglm_targets(model)
    checked = len(targets)
    wrong = [f"{name} ({type(m).__name__})" for name, m in targets if not isinstance(m, expected)]
    if wrong or not checked:
        raise QuantizationError(
            f"{quantize} load left {len(wrong)} of {checked} decoder projections unquantized "
            f"(expected {expected.__name__}): {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}"
        )
    return checked


def guard_cpu_int4_packing(model: nn.Module) -> int:
    """Keep every 4-bit layer on bitsandbytes' portable CPU path.

    On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place on its first
    inference forward: the NF4 bytes change layout and the quantization statistics are unpacked to
    float32, so the layer no longer holds what the planner estimated and the Model tab reports (the
    small test model grew from 34.8 kB to 50.2 kB), and layers narrower than one quantization block
    (in_features 32 with 64-value blocks, as in tiny real-config MoE checkpoints) fail with a reshape
    error. The app's int4 path is for GPUs; on a CPU it must behave, and take the memory it said it
    would, whatever the CPU. Returns how many layers were switched."""
    import bitsandbytes as bnb

    switched = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def _autoglm_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS + EXPERT_PROJECTIONS
            and not is_kept_16bit(name)]


def _hf_targets(model: nn.Module, family) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear and every fused 3-D expert module inside the decoder layers, outside the kept modules."""
    prefix, keep = family.layers_path + ".", set(family.keep_16bit)
    return [(name, m) for name, m in model.named_modules()
            if name.startswith(prefix) and not keep & set(name.split("."))
            and (isinstance(m, nn.Linear) or any(p.dim() == 3 for p in m.parameters(recurse=False)))]


# ----------------------------------------------------------------------------- checkpoints


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them only at import)."""
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a filesystem path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_checkpoint(name_or_path: str) -> str:
    """A local directory for ``name_or_path``: the directory itself, or the hub id's snapshot in the HF cache."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json: not a model checkpoint")
        return path
    if _looks_like_path(name_or_path) or os.path.exists(path):
        raise ModelNotFoundError(
            f"no model directory at {path!r}. Give the path of a saved checkpoint (a directory with "
            f"config.json, model.safetensors and the tokenizer files) or a hub id such as 'org/model'."
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        return snapshot_download(name_or_path, local_files_only=offline)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as err:
        cache = constants.HF_HUB_CACHE
        if offline:
            why = (
                f"there is no local directory {path!r}, HF_HUB_OFFLINE=1 is set and the hub id "
                f"{name_or_path!r} is not in the local HF cache ({cache})"
            )
        else:
            why = f"{name_or_path!r} could not be fetched from the hub and is not in the local HF cache ({cache})"
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}: {why}. Fix: on a machine with network run "
            f"`hf download {name_or_path}` (with the same HF_HOME) and copy the cache here, or "
            f"save the model to a directory and pass that path"
            + ("" if offline else ", or check the network / HF_ENDPOINT / token for private models")
            + f". ({type(err).__name__}: {err})"
        ) from err


# ----------------------------------------------------------------------------- placement


def _device_budget(device: int | str, gpu_memory: str | None) -> int:
    if gpu_memory:
        return parse_memory(gpu_memory)
    if isinstance(device, int):
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)  # leave room for activations and the KV cache
    pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size * 0.9)


def _resolve_devices(gpus: list | None) -> list[int | str]:
    if gpus is None:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    devices = [normalize_device(g) for g in gpus]
    missing = [d for d in devices if isinstance(d, int) and d >= torch.cuda.device_count()]
    if missing:
        raise ValueError(
            f"GPU(s) {missing} requested but {torch.cuda.device_count()} CUDA device(s) are visible; "
            f"drop --gpus to run on the CPU"
        )
    return devices


def _offload_map(config, devices: list[int | str], gpu_memory: str | None, quantize: str) -> dict:
    """Fill the GPUs first, then the CPU (accelerate), when the model does not fit the GPUs alone."""
    from accelerate import infer_auto_device_map

    from .planning import build_on_meta

    meta = build_on_meta(config)
    max_memory: dict = {d: _device_budget(d, gpu_memory) for d in devices if d != "cpu"}
    max_memory["cpu"] = _device_budget("cpu", None)
    dtype = model_dtype(quantize)
    return infer_auto_device_map(
        meta, max_memory=max_memory, no_split_module_classes=["AutoGLMDecoderLayer"], dtype=dtype
    )


# ----------------------------------------------------------------------------- loading


def load_model(
    name_or_path: str,
    quantize: str | None = None,
    gpus: list[int | str] | None = None,
    gpu_memory: str | None = None,
    attn_implementation: str = "sdpa",
    offload_cpu: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load an AutoGLM checkpoint and its processor.

    quantize: one of QUANTIZE_CHOICES (default: int4 with a GPU, fp32 without).
    gpus: devices to shard over (indices, 'cuda:N', or 'cpu' as a test stand-in); default
        all visible GPUs, or the CPU when there is none.
    gpu_memory: per-device weight budget ('24GiB'); default 90% of each GPU's free memory.
    offload_cpu: when the plan does not fit the GPUs, put what is left on the CPU.
    trust_remote_code: let transformers run Python code shipped with the checkpoint (config, model or
        processor classes). Off by default; only for checkpoints you trust.

    Weights are read from safetensors only (``use_safetensors=True``): a checkpoint with only pickled
    ``.bin`` / ``.pt`` weights is refused (unpickling can run arbitrary code), with a note to convert it.
    """
    import autoglm_app.modeling  # noqa: F401  (registers model_type "autoglm" with the Auto classes)
    from transformers import AutoConfig

    from ..families import family_for
    from .planning import PlanError

    quantize = quantize or default_quantize()
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    path = resolve_checkpoint(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)  # an unsupported model_type fails here, before any weight is read
    require_safetensors(path)
    devices = _resolve_devices(gpus)
    on_gpu = any(isinstance(d, int) for d in devices)
    if family.name != "autoglm":
        return _load_hf(path, model_id_of(name_or_path), family, quantize, devices, gpu_memory, attn_implementation,
                        config=config, trust_remote_code=trust_remote_code)
    qconfig = quantization_config(quantize, on_gpu)
    dtype = model_dtype(quantize, on_gpu)

    plan: Plan | None = None
    if devices:
        budget = min(_device_budget(d, gpu_memory) for d in devices)
        try:
            plan = plan_device_map(config, devices, budget, quantize)
            device_map: dict = dict(plan.device_map)
            logger.info("loading %s (%s) with device plan:\n%s", name_or_path, quantize, plan.table())
        except PlanError:
            if not offload_cpu:
                raise
            device_map = _offload_map(config, devices, gpu_memory, quantize)
            logger.warning("model does not fit the GPUs; offloading to the CPU with device map %s", device_map)
            if qconfig is not None:
                qconfig.llm_int8_enable_fp32_cpu_offload = True
    else:
        device_map = {"": "cpu"}
        logger.info("loading %s (%s) on the CPU", name_or_path, quantize)

    from transformers import AutoModelForImageTextToText

    from autoglm_app.modeling import AutoGLMProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=qconfig,
        device_map=device_map,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    ).eval()
    checked = verify_quantized(model, quantize)
    if quantize == "int4":
        guard_cpu_int4_packing(model)
    if checked:
        logger.info("%d decoder projections verified %s", checked, quantize)
    processor = AutoGLMProcessor.from_pretrained(path)
    return LoadedModel(
        model=model,
        processor=processor,
        model_id=model_id_of(name_or_path),
        quantize=quantize,
        device_map=device_map,
        plan=plan,
    )


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose weights exist only as pickles (.bin / .pt / .pth / .ckpt)."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str) -> None:
    """Refuse a checkpoint directory that holds no ``*.safetensors`` weights (pickled weights only, or none)."""
    names = os.listdir(path)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args"))
    if pickles:
        raise UnsafeCheckpointError(
            f"{path} holds only pickled weights ({', '.join(pickles[:4])}{' ...' if len(pickles) > 4 else ''}); "
            "this app loads safetensors only, since unpickling a checkpoint can run arbitrary code. Convert it to "
            "safetensors on a trusted machine, e.g. `model = AutoModel...from_pretrained(path); "
            "model.save_pretrained(out, safe_serialization=True)`, or use the hub's safetensors revision."
        )
    raise ModelNotFoundError(f"{path} holds no model weights (*.safetensors)")


def model_id_of(name_or_path: str) -> str:
    """The id clients see: a hub id as given, a local checkpoint by its folder name."""
    return os.path.basename(os.path.normpath(name_or_path)) if os.path.isdir(name_or_path) else str(name_or_path)


def _load_hf(path: str, model_id: str, family, quantize: str, devices: list, gpu_memory: str | None,
             attn_implementation: str, config=None, trust_remote_code: bool = False) -> LoadedModel:
    """A transformers-native checkpoint (GLM-4.xV, Qwen-VL, Qwen-Omni): its Auto class and AutoProcessor.

    Placement over several GPUs is accelerate's ``device_map="auto"`` within the per-GPU budget (decoder
    layers are never split: the model's ``_no_split_modules``); the exact-bytes planner covers AutoGLM only.
    Fused 3-D experts, which bitsandbytes leaves 16-bit, are split into per-expert 4-bit layers.
    A composite checkpoint (Qwen-Omni) loads only ``family.sub_config`` (the Thinker) with the family's model
    class; transformers' key mapping for that class drops the ``thinker.`` prefix, and the talker's weights
    are left unread.
    """
    import transformers
    from transformers import AutoProcessor

    on_gpu = any(isinstance(d, int) for d in devices)
    qconfig = quantization_config(quantize, on_gpu, keep_16bit=family.keep_16bit)
    gpu_ids = [d for d in devices if isinstance(d, int)]
    if gpu_ids:
        device_map: Any = "auto"
        max_memory = {d: _device_budget(d, gpu_memory) for d in gpu_ids}
    else:
        device_map, max_memory = {"": "cpu"}, None
    logger.info("loading %s (%s, family %s) on %s", model_id, quantize, family.name, gpu_ids or "the CPU")
    auto_class = getattr(transformers, family.auto_class)
    extra: dict = {}
    sub = getattr(config, family.sub_config, None) if family.sub_config and config is not None else None
    if sub is not None:
        extra["config"] = sub  # the Thinker of an Omni checkpoint
    kwargs = dict(dtype=model_dtype(quantize, on_gpu), quantization_config=qconfig, device_map=device_map,
                  max_memory=max_memory, attn_implementation=attn_implementation, use_safetensors=True,
                  trust_remote_code=trust_remote_code, **extra)
    if quantize == "int4" and family.fused_experts:
        from .fused_experts import check_split, split_fused_experts, streamed_expert_split

        # each fused expert tensor is packed to 4-bit as it is read, so the 16-bit experts are never all held
        with streamed_expert_split(compute_dtype(on_gpu)) as streamed:
            model = auto_class.from_pretrained(path, **kwargs).eval()
        late = split_fused_experts(model, compute_dtype(on_gpu))  # whatever the stream did not see (none, normally)
        logger.info("fused experts: %d modules packed to 4-bit while loading, %d after", streamed["modules"], late)
        check_split(model)
    else:
        model = auto_class.from_pretrained(path, **kwargs).eval()
    checked = verify_quantized(model, quantize, family)
    if quantize == "int4":
        guard_cpu_int4_packing(model)
    if checked:
        logger.info("%d decoder projections verified %s", checked, quantize)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, processor=processor, model_id=model_id, quantize=quantize,
                       device_map=getattr(model, "hf_device_map", device_map), plan=None)
