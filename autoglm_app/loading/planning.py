"""Device planning: how many bytes each part of the model holds, and which device holds it.

The model is cut into *placement units* that are never split across devices. For AutoGLM:

    model.vision_tower, model.audio_tower, model.adapter, model.embed_tokens,
    model.layers.0 ... model.layers.{N-1}, model.norm, lm_head

and for a transformers family the same cut around its ``layers_path`` (``model.visual``,
``model.language_model.embed_tokens``, ``model.language_model.layers.i``, ``model.language_model.norm``,
``lm_head``; an Omni thinker adds ``model.audio_tower``). The encoders, the adapter and the embeddings
go on the first device (the multimodal prefix is built there), the final norm and ``lm_head`` on the
last, and the decoder layers are cut into contiguous runs, one per device, chosen to minimise the
largest per-device total. Everything here runs on the ``meta`` device: a 9B configuration is planned
in about a second without allocating its weights. The bytes of a quantized weight come from
``quantize`` (what bitsandbytes stores); which layers are quantized follows transformers' own rule
(``quantize.converts``), and fused 3-D experts count as the per-expert NF4 layers the loader splits
them into, so the estimate is what a load (or a ``random:`` build) holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..config import normalize_device_text, parse_gpus
from .quantize import converts, int8_weight_bytes, nf4_weight_bytes, skip_patterns

logger = logging.getLogger(__name__)

GiB = 1024**3

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int4": 2, "int8": 2}  # non-quantized tensors

ENCODER_UNITS = ("model.vision_tower", "model.audio_tower", "model.adapter", "model.embed_tokens")
HEAD_UNITS = ("model.norm", "lm_head")
AUTOGLM_LAYERS = "model.layers"
FUSED_EXPERT_NAMES = ("gate_up_proj", "down_proj")  # (E, out, in) each; see fused_experts


class PlanError(ValueError):
    """The model does not fit the devices and budget given."""


# ----------------------------------------------------------------------------- helpers


def parse_memory(text: str | int) -> int:
    """'24GiB' / '24 GB' / '512MiB' / '512MB' / '1024' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 24GiB, 24GB, 512MiB or 512MB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    if unit == "B":
        scale = 1
    else:
        power = "KMGT".index(unit[0]) + 1
        scale = (1024 if "I" in unit else 1000) ** power
    return int(value * scale)


def normalize_device(device: Any) -> int | str:
    """0 / '0' / 'cuda:0' / torch.device('cuda', 0) -> 0 ; 'cpu' -> 'cpu' (what accelerate's device maps take)."""
    if isinstance(device, torch.device):
        device = str(device) if device.index is None else (device.index if device.type == "cuda" else str(device))
    if isinstance(device, int):
        return device
    return normalize_device_text(device)


def device_label(device: int | str) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def placement_unit(param_name: str, layers_path: str = AUTOGLM_LAYERS) -> str:
    """The placement unit a parameter or buffer belongs to: its decoder layer (``layers_path.i``), or the
    child it sits in of one of the decoder's ancestors (``model.visual``, ``model.language_model.norm``,
    ``lm_head``)."""
    prefix = layers_path + "."
    if param_name.startswith(prefix):
        return prefix + param_name[len(prefix):].split(".", 1)[0]
    parts, ancestors = param_name.split("."), layers_path.split(".")[:-1]
    depth = 0
    while depth < len(ancestors) and len(parts) > depth + 1 and parts[depth] == ancestors[depth]:
        depth += 1
    return ".".join(parts[: depth + 1])


def placement_units(num_layers: int) -> list[str]:
    return [*ENCODER_UNITS, *(f"model.layers.{i}" for i in range(num_layers)), *HEAD_UNITS]


def head_units(layers_path: str) -> tuple[str, str]:
    """The units the last device holds: the decoder's final norm and the output head."""
    return f"{layers_path.rsplit('.', 1)[0]}.norm", "lm_head"


# ----------------------------------------------------------------------------- estimation


def build_on_meta(config_or_model: Any, dtype: torch.dtype | None = None,
                  attn_implementation: str | None = None) -> nn.Module:
    """A model on the meta device (no memory for its weights) from a config, a config path or a model.

    AutoGLM or any transformers family (``load_config``). Parameters are meta; buffers (rotary
    frequencies, sinusoidal position tables) are computed for real on the CPU, as a load would have
    them, and tied weights are tied. ``dtype`` is the dtype the parameters get (default: float32).
    """
    if isinstance(config_or_model, nn.Module):
        return config_or_model
    from accelerate import init_empty_weights

    config = load_config(config_or_model)
    cls = model_class(config)
    kwargs: dict = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, **kwargs)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding's tensor, counted and made once
    return model


def model_class(config):
    """The class a load of ``config`` builds: AutoGLM's, or the family's transformers class."""
    from ..families import family_for

    family = family_for(config)
    if family.name == "autoglm":
        from autoglm_app.modeling import AutoGLMForConditionalGeneration

        return AutoGLMForConditionalGeneration
    import transformers

    if family.auto_class.startswith("Auto"):  # the Auto class's choice for this config type
        auto = getattr(transformers, family.auto_class)
        return auto._model_mapping[type(config)]
    return getattr(transformers, family.auto_class)


def load_config(source: Any):
    """The config a model is built from: an AutoGLMConfig or a transformers config of a supported family
    (an Omni checkpoint's thinker part), from a config object, a JSON file, a checkpoint directory or a dict.
    """
    from transformers import PretrainedConfig

    from autoglm_app.modeling import AutoGLMConfig

    if isinstance(source, PretrainedConfig):
        return _family_part(source)
    if isinstance(source, dict):
        if source.get("model_type", "autoglm") == "autoglm":
            return AutoGLMConfig(**{k: v for k, v in source.items() if k != "model_type"})
        return _family_part(_hf_config(source["model_type"], "the given dict").from_dict(source))
    path = os.fspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} is a directory without a config.json: give a model config JSON file")
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model config at {path!r} (give a config JSON file or a checkpoint directory)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as a model config JSON: {err}") from err
    model_type = data.get("model_type", "autoglm") if isinstance(data, dict) else None
    if model_type == "autoglm":
        return AutoGLMConfig.from_json_file(path)
    return _family_part(_hf_config(model_type, path).from_json_file(path))


def _hf_config(model_type, where: str):
    """The transformers config class of ``model_type``, or an error naming the supported architectures."""
    from transformers import CONFIG_MAPPING

    from ..families import HF_FAMILIES

    if model_type in HF_FAMILIES and model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type]
    supported = ", ".join(["autoglm", *HF_FAMILIES])
    raise ValueError(f"{where}: model_type {model_type!r} is not an architecture this app supports "
                     f"(supported: {supported}); give the config.json of one of those")


def _family_part(config):
    """The part of a composite config the family loads (the Thinker of a Qwen-Omni checkpoint)."""
    from ..families import family_for

    family = family_for(config)
    sub = getattr(family, "sub_config", None)
    part = getattr(config, sub, None) if sub else None
    return part if part is not None else config


def layers_path_of(model: nn.Module) -> str:
    """Where the decoder layers sit: the family's ``layers_path`` (AutoGLM: ``model.layers``)."""
    from ..families import family_for

    return getattr(family_for(model), "layers_path", AUTOGLM_LAYERS)


def estimate_module_bytes(model_on_meta: nn.Module, quantize: str, buffers: bool = True) -> dict[str, int]:
    """Bytes each placement unit holds once loaded with ``quantize`` (int4/int8/fp16/bf16/fp32).

    int4: every layer a bitsandbytes load converts (``quantize.converts``: an ``nn.Linear`` outside the
    family's 16-bit modules) is NF4 with double quantization, and fused 3-D experts are one NF4 layer per
    expert and projection (what the loader splits them into); int8: those layers are LLM.int8 (1 byte per
    value + a float32 scale per row) and fused experts stay 16-bit; everything else (biases, kept modules,
    norms, embeddings) is 16-bit when quantizing, and the chosen dtype's size otherwise. A tied weight
    counts once. ``buffers=False`` leaves buffers (rotary tables, ...) out: the parameters' bytes alone,
    exactly what the loaded parameters and their quantization states hold.
    """
    if quantize not in BYTES_PER_PARAM:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {sorted(BYTES_PER_PARAM)}")
    from ..families import family_for

    family = family_for(model_on_meta)
    layers_path = getattr(family, "layers_path", AUTOGLM_LAYERS)
    patterns = skip_patterns(model_on_meta, getattr(family, "keep_16bit", None))
    split_experts = quantize == "int4" and getattr(family, "fused_experts", False)
    plain = BYTES_PER_PARAM[quantize]
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for module_name, module in model_on_meta.named_modules():
        quantized = quantize in ("int4", "int8") and converts(module_name, module, patterns)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if quantized and pname == "weight":
                nbytes = nf4_weight_bytes(p.numel()) if quantize == "int4" else int8_weight_bytes(*p.shape)
            elif split_experts and pname in FUSED_EXPERT_NAMES and p.dim() == 3:
                nbytes = p.shape[0] * nf4_weight_bytes(p.shape[1] * p.shape[2])
            else:
                nbytes = p.numel() * plain
            unit = placement_unit(f"{module_name}.{pname}" if module_name else pname, layers_path)
            sizes[unit] = sizes.get(unit, 0) + nbytes
        for bname, b in module.named_buffers(recurse=False) if buffers else ():
            unit = placement_unit(f"{module_name}.{bname}" if module_name else bname, layers_path)
            size = plain if b.is_floating_point() else b.element_size()
            sizes[unit] = sizes.get(unit, 0) + b.numel() * size
    return sizes


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Where each placement unit goes, and the estimated bytes on each device."""

    device_map: dict[str, int | str]
    bytes_per_device: dict[str, int]  # keyed by device label ('cuda:0', 'cpu', or 'cpu#1' for repeats)
    total_bytes: int
    quantize: str
    budget_bytes_per_device: int = 0
    devices: list[int | str] = field(default_factory=list)
    slot_labels: list[str] = field(default_factory=list)
    units_per_slot: list[list[str]] = field(default_factory=list)
    layers_path: str = AUTOGLM_LAYERS
    head: tuple[str, ...] = HEAD_UNITS  # the units after the decoder layers (final norm, lm_head)

    def layers_on(self, slot: int) -> list[int]:
        prefix = self.layers_path + "."
        return [int(u.rsplit(".", 1)[1]) for u in self.units_per_slot[slot] if u.startswith(prefix)]

    def table(self) -> str:
        """Which units and layers sit on which device, and the estimated GiB per device."""
        rows = [f"{'device':<10} {'holds':<66} {'est. GiB':>9}"]
        rows.append("-" * len(rows[0]))
        for slot, label in enumerate(self.slot_labels):
            units = self.units_per_slot[slot]
            front = [u for u in units if u not in self.head and not u.startswith(self.layers_path + ".")]
            parts = [u.split(".")[-1] for u in front]
            layers = self.layers_on(slot)
            if layers:
                span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
                parts.append(f"{span} ({len(layers)})")
            parts += [u.split(".")[-1] for u in units if u in self.head]
            rows.append(f"{label:<10} {', '.join(parts) or '-':<66} {self.bytes_per_device[label] / GiB:>9.2f}")
        rows.append("-" * len(rows[0]))
        budget = f"{self.quantize}, budget {self.budget_bytes_per_device / GiB:.2f} GiB per device"
        rows.append(f"{'total':<10} {budget:<66} {self.total_bytes / GiB:>9.2f}")
        return "\n".join(rows)


def _slot_labels(devices: list[int | str]) -> list[str]:
    labels = [device_label(d) for d in devices]
    return [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _balanced_partition(fixed: list[int], layers: list[int]) -> list[int]:
    """Cut ``layers`` into len(fixed) contiguous runs minimising max(fixed[d] + run_d).

    Returns the run boundaries (len(fixed) + 1 indices). Exact DP over contiguous
    partitions, O(D * L^2), tiny for any real model; ties go to the earliest cut.
    """
    D, L = len(fixed), len(layers)
    prefix = [0]
    for b in layers:
        prefix.append(prefix[-1] + b)
    INF = float("inf")
    # best[d][j]: minimal max load placing the first j layers on devices 0..d.
    best = [[INF] * (L + 1) for _ in range(D)]
    cut = [[0] * (L + 1) for _ in range(D)]
    for j in range(L + 1):
        best[0][j] = fixed[0] + prefix[j]
    for d in range(1, D):
        for j in range(L + 1):
            for i in range(j + 1):
                load = max(best[d - 1][i], fixed[d] + prefix[j] - prefix[i])
                if load < best[d][j]:
                    best[d][j], cut[d][j] = load, i
    bounds = [L]
    for d in range(D - 1, 0, -1):
        bounds.append(cut[d][bounds[-1]])
    bounds.append(0)
    return bounds[::-1]


def plan_device_map(
    config_or_model: Any, devices: list, budget_bytes_per_device: int | str, quantize: str
) -> Plan:
    """Place the model on ``devices`` (GPU indices, 'cuda:N' or 'cpu') within a per-device byte budget.

    Encoders, adapter and embeddings on the first device; the final norm and lm_head on the last;
    decoder layers contiguous, never split, balanced to minimise the busiest device.
    Raises PlanError (saying how much is missing) when it does not fit.
    """
    if not devices:
        raise ValueError("plan_device_map needs at least one device")
    budget = parse_memory(budget_bytes_per_device)
    devs = [normalize_device(d) for d in devices]
    labels = _slot_labels(devs)
    model = build_on_meta(config_or_model)
    sizes = estimate_module_bytes(model, quantize)
    layers_path = layers_path_of(model)
    num_layers = len(model.get_submodule(layers_path))
    layer_units = [f"{layers_path}.{i}" for i in range(num_layers)]
    head = tuple(u for u in head_units(layers_path) if u in sizes)
    front = [u for u in sizes if u not in head and u not in set(layer_units)]  # in the model's order
    layer_bytes = [sizes.get(u, 0) for u in layer_units]
    fixed = [0] * len(devs)
    fixed[0] += sum(sizes[u] for u in front)
    fixed[-1] += sum(sizes[u] for u in head)
    bounds = _balanced_partition(fixed, layer_bytes)

    device_map: dict[str, int | str] = {}
    units_per_slot: list[list[str]] = [[] for _ in devs]
    for u in front:
        device_map[u] = devs[0]
        units_per_slot[0].append(u)
    for slot in range(len(devs)):
        for u in layer_units[bounds[slot] : bounds[slot + 1]]:
            device_map[u] = devs[slot]
            units_per_slot[slot].append(u)
    for u in head:
        device_map[u] = devs[-1]
        units_per_slot[-1].append(u)
    loads = [fixed[s] + sum(layer_bytes[bounds[s] : bounds[s + 1]]) for s in range(len(devs))]
    total = sum(sizes.values())
    plan = Plan(
        device_map=device_map,
        bytes_per_device=dict(zip(labels, loads)),
        total_bytes=total,
        quantize=quantize,
        budget_bytes_per_device=budget,
        devices=devs,
        slot_labels=labels,
        units_per_slot=units_per_slot,
        layers_path=layers_path,
        head=head,
    )
    worst = max(loads)
    if worst > budget:
        short_total = total - budget * len(devs)
        busiest = labels[loads.index(worst)]
        detail = (
            f"the model needs {total / GiB:.2f} GiB in {quantize}; {len(devs)} device(s) x "
            f"{budget / GiB:.2f} GiB = {budget * len(devs) / GiB:.2f} GiB"
        )
        if short_total > 0:
            detail += f", {short_total / GiB:.2f} GiB missing in total"
        detail += (
            f"; the busiest device ({busiest}) would need {worst / GiB:.2f} GiB, "
            f"{(worst - budget) / GiB:.2f} GiB over its budget (decoder layers are never split)"
        )
        fixes = (["use --quantize int4"] if quantize != "int4" else []) + [
            "raise --gpu-memory if the GPUs have that much free", "list more GPUs in --gpus (e.g. --gpus 0,1)"]
        raise PlanError(f"the model does not fit: {detail}. Fix: {', or '.join(fixes)}.\n{plan.table()}")
    return plan


# ----------------------------------------------------------------------------- CLI


def parse_devices(gpus: str | Iterable | None) -> list[int | str]:
    """'0,1' / 'cuda:0,cpu' (through the one --gpus parser) / [0, 'cpu', torch.device] -> normalized devices."""
    if isinstance(gpus, str):
        return parse_gpus(gpus) or []
    return [normalize_device(g) for g in gpus or [] if str(g) != ""]


def run_plan(gpus: str, gpu_memory: str, quantize: str, model_config: str) -> str:
    """Plan ``model_config`` over ``gpus`` with ``gpu_memory`` each; return (and log) the table.

    Needs no GPU: the model is built on the meta device only.
    """
    devices = parse_devices(gpus) or ["cpu"]
    plan = plan_device_map(load_config(model_config), devices, parse_memory(gpu_memory), quantize)
    table = plan.table()
    logger.info("device plan for %s:\n%s", model_config, table)
    return table
