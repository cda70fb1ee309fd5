"""Loading a checkpoint: resolving it (local directory, hub id, HF cache), placing it, reading its processor.

``load_model`` takes a local directory or a hub id (resolved through the usual HF
cache; ``HF_HUB_OFFLINE=1`` is honoured and a missing model gives an error that says
what to do), or ``random:<config.json>`` (built with seeded random weights by ``random_build``,
no weights read), loads it in the format asked for with the bitsandbytes config from
``quantize`` (the decoder's projections and experts 4-bit, the encoders, adapter,
router gates, embeddings and output head 16-bit), places it on the GPUs with a plan
from ``planning`` (or on the CPU when there is none), and proves afterwards, with
``quantize.verify_quantized``, that every projection that should be 4-bit is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .planning import Plan, normalize_device, parse_memory, plan_device_map
from .progress import LoadProgress, counting_weights, current_progress
from .quantize import (
    QUANTIZE_CHOICES,
    check_load,
    compute_dtype,
    default_quantize,
    model_dtype,
    quantization_config,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "ModelNotFoundError",
    "UnsafeCheckpointError",
    "load_model",
    "require_safetensors",
    "resolve_checkpoint",
]


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint is neither a local directory nor reachable / cached on the hub."""


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    model_id: str
    quantize: str
    device_map: dict | None
    plan: Plan | None


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


# ----------------------------------------------------------------------------- loading


def load_model(
    name_or_path: str,
    quantize: str | None = None,
    gpus: list[int | str] | None = None,
    gpu_memory: str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    progress: LoadProgress | None = None,
    seed: int | None = None,
) -> LoadedModel:
    """Load an AutoGLM or transformers-family checkpoint and its processor, or build ``random:<config.json>``.

    quantize: one of QUANTIZE_CHOICES (default: int4 with a GPU, fp32 without).
    gpus: devices to shard over (indices, 'cuda:N', or 'cpu' as a test stand-in); default
        all visible GPUs, or the CPU when there is none.
    gpu_memory: per-device weight budget ('24GiB'); default 90% of each GPU's free memory.
    trust_remote_code: let transformers run Python code shipped with the checkpoint (config, model or
        processor classes). Off by default; only for checkpoints you trust.
    progress: where the stages and the weights loaded / total are reported (the loading page reads it);
        by default the one a ``progress.reporting`` block set on this thread.
    seed: the weights' seed of a ``random:`` model (default ``random_build.DEFAULT_SEED``, 0).

    Weights are read from safetensors only (``use_safetensors=True``): a checkpoint with only pickled
    ``.bin`` / ``.pt`` weights is refused (unpickling can run arbitrary code), with a note to convert it.
    """
    import autoglm_app.modeling  # noqa: F401  (registers model_type "autoglm" with the Auto classes)
    from transformers import AutoConfig

    from ..families import family_for

    progress = progress or current_progress(str(name_or_path))
    quantize = quantize or default_quantize()
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    from .random_build import DEFAULT_SEED, build_random, is_random

    if is_random(name_or_path):
        devices = _resolve_devices(gpus)
        budget = min(_device_budget(d, gpu_memory) for d in devices) if devices else (
            parse_memory(gpu_memory) if gpu_memory else None)
        return LoadedModel(**build_random(str(name_or_path), quantize, devices, budget,
                                          DEFAULT_SEED if seed is None else seed, attn_implementation, progress))
    progress.stage("finding the checkpoint")
    path = resolve_checkpoint(name_or_path)
    progress.stage("reading the config")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)  # an unsupported model_type fails here, before any weight is read
    require_safetensors(path)
    devices = _resolve_devices(gpus)
    if family.name != "autoglm":
        return _load_hf(path, model_id_of(name_or_path), family, quantize, devices, gpu_memory, attn_implementation,
                        config=config, trust_remote_code=trust_remote_code, progress=progress)
    qconfig = quantization_config(quantize)
    dtype = model_dtype(quantize)

    plan: Plan | None = None
    if devices:
        budget = min(_device_budget(d, gpu_memory) for d in devices)
        plan = plan_device_map(config, devices, budget, quantize)  # PlanError when it does not fit
        device_map: dict = dict(plan.device_map)
        logger.info("loading %s (%s) with device plan:\n%s", name_or_path, quantize, plan.table())
    else:
        device_map = {"": "cpu"}
        logger.info("loading %s (%s) on the CPU", name_or_path, quantize)

    from transformers import AutoModelForImageTextToText

    from autoglm_app.modeling import AutoGLMProcessor

    progress.stage("loading weights", unit="tensors")
    with counting_weights(progress):
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=qconfig,
            device_map=device_map,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        ).eval()
    check_load(model, quantize, progress)
    progress.stage("loading the processor")
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
             attn_implementation: str, config=None, trust_remote_code: bool = False,
             progress: LoadProgress | None = None) -> LoadedModel:
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

    progress = progress or current_progress(model_id)
    qconfig = quantization_config(quantize, keep_16bit=family.keep_16bit)
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
    kwargs = dict(dtype=model_dtype(quantize), quantization_config=qconfig, device_map=device_map,
                  max_memory=max_memory, attn_implementation=attn_implementation, use_safetensors=True,
                  trust_remote_code=trust_remote_code, **extra)
    progress.stage("loading weights", unit="tensors")
    if quantize == "int4" and family.fused_experts:
        from .fused_experts import check_split, split_fused_experts, streamed_expert_split

        # each fused expert tensor is packed to 4-bit as it is read, so the 16-bit experts are never all held
        with streamed_expert_split(compute_dtype()) as streamed, counting_weights(progress):
            model = auto_class.from_pretrained(path, **kwargs).eval()
        progress.stage("splitting fused experts")
        late = split_fused_experts(model, compute_dtype())  # whatever the stream did not see (none, normally)
        logger.info("fused experts: %d modules packed to 4-bit while loading, %d after", streamed["modules"], late)
        check_split(model)
    else:
        with counting_weights(progress):
            model = auto_class.from_pretrained(path, **kwargs).eval()
    check_load(model, quantize, progress, family)
    progress.stage("loading the processor")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, processor=processor, model_id=model_id, quantize=quantize,
                       device_map=getattr(model, "hf_device_map", device_map), plan=None)
