"""``--model random:<config.json>``: any supported architecture, any size, with seeded random weights.

Nothing is downloaded and the model is never held in 16 or 32 bits as a whole. The model is built on
the meta device (``planning.build_on_meta``: parameters take no memory, buffers such as rotary
frequencies are computed for real); under int4 / int8 its linear layers are swapped for bitsandbytes
layers by transformers' own ``replace_with_bnb_linear`` with the skip list an ordinary load uses
(``quantize.skip_patterns``: the family's 16-bit modules). Then, one placement unit at a time (the
vision tower, the embeddings, each decoder layer, the head), each parameter is materialised on the
device the plan gives its unit:

- a quantized layer's weight is drawn in float16 and handed to ``bnb.nn.Params4bit`` (``Int8Params``),
  which packs it as it moves to its device: exactly what transformers' bitsandbytes quantizer does with a
  checkpoint tensor, so the layers are the ones an ordinary load produces;
- fused 3-D experts (Qwen3-VL-MoE, GLM-4.5V, Qwen3-Omni) become ``fused_experts.SplitExperts``, one NF4
  layer per expert, as the loader's streamed split makes them; under fp16 / bf16 / fp32 they stay fused;
- every other tensor is drawn directly in its dtype on its device.

Values: norms' weights are ones, biases zeros, everything else normal(0, initializer_range) (the text
config's, 0.02 where it has none). Each tensor has its own random stream, seeded from ``seed`` and the
tensor's name (an expert's slice from its name and index), so the same seed gives the same weights
whatever the devices, the order or the format: an int4 layer holds exactly the NF4 packing of the
float16 tensor ``random_tensor(seed, name, ...)`` returns. The seed is ``--random-seed`` (default 0).

The tokenizer and processor come from ``random_processor`` (vocabulary of the config's size, special
tokens at the config's ids). Progress: the stage and the units built / total (``LoadProgress``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..config import ASSETS
from .planning import Plan, build_on_meta, layers_path_of, load_config, placement_unit, plan_device_map
from .progress import LoadProgress, current_progress
from .quantize import QUANTIZE_CHOICES, check_load, compute_dtype, model_dtype

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SEED", "RANDOM_PREFIX", "build_random", "is_random", "random_config_path", "random_tensor"]

RANDOM_PREFIX = "random:"
DEFAULT_SEED = 0
CONFIGS = ASSETS / "configs"
CHUNK = 1 << 24  # values drawn per step (64 MiB of float32): a tensor's draw never holds more than this twice
DEFAULT_STD = 0.02


def is_random(name: str | os.PathLike | None) -> bool:
    return str(name or "").startswith(RANDOM_PREFIX)


def random_config_path(spec: str) -> Path:
    """The config file a ``random:`` spec names: a JSON file, a checkpoint directory's config.json, or a
    shipped config by name (``random:glm-4.1v-9b-thinking`` = assets/configs/glm-4.1v-9b-thinking.json)."""
    text = str(spec)[len(RANDOM_PREFIX):] if is_random(spec) else str(spec)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    shipped = CONFIGS / (text if text.endswith(".json") else text + ".json")
    if text and "/" not in text and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json"))) if CONFIGS.is_dir() else "none"
    raise FileNotFoundError(f"random: needs a model config: {text!r} is neither a config JSON file nor a directory "
                            f"with a config.json. Give e.g. --model random:assets/configs/glm-4.1v-9b-thinking.json "
                            f"or a shipped name ({names})")


# ----------------------------------------------------------------------------- values


def _stream_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_tensor(seed: int, name: str, shape, std: float = DEFAULT_STD, dtype: torch.dtype = torch.float16,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """normal(0, std) values of the tensor ``name``: the same for the same (seed, name, shape), on any device.

    Drawn on the CPU in float32 chunks of ``CHUNK`` values from a generator seeded by (seed, name), each
    chunk scaled and written into the ``dtype`` tensor (on ``device``) at once.
    """
    generator = torch.Generator().manual_seed(_stream_seed(seed, name))
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        chunk = torch.randn(min(CHUNK, flat.numel() - start), generator=generator).mul_(std)
        flat[start : start + chunk.numel()].copy_(chunk)
    return out


def initial_value(module: nn.Module, pname: str, full_name: str, param: torch.Tensor, seed: int, std: float,
                  device) -> torch.Tensor:
    """A parameter's starting value: ones for a norm's weight, zeros for a bias, else seeded normal(0, std)."""
    if pname == "bias" or pname.endswith("_bias"):
        return torch.zeros(param.shape, dtype=param.dtype, device=device)
    if pname == "weight" and "norm" in type(module).__name__.lower():
        return torch.ones(param.shape, dtype=param.dtype, device=device)
    return random_tensor(seed, full_name, param.shape, std, param.dtype, device)


def initializer_range(config) -> float:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (text, config):
        for name in ("initializer_range", "init_std"):
            value = getattr(c, name, None)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
    return DEFAULT_STD


# ----------------------------------------------------------------------------- materialising


class _Materialiser:
    """Turns the meta model's parameters into real ones, unit by unit, on the planned devices."""

    def __init__(self, model: nn.Module, seed: int, std: float, split_experts: bool):
        self.model, self.seed, self.std, self.split_experts = model, seed, std, split_experts
        # id(meta parameter) -> (it, its real one): a weight two modules share (tied embeddings) stays shared
        self.done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def module(self, name: str, module: nn.Module, device) -> None:
        import bitsandbytes as bnb

        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            if id(p) in self.done:
                module._parameters[pname] = self.done[id(p)][1]
                continue
            if isinstance(p, bnb.nn.Params4bit) and pname == "weight":
                # as transformers' Bnb4bitQuantize: the 16-bit value packed by Params4bit moving to its device
                value = random_tensor(self.seed, full, p.shape, self.std, compute_dtype())
                new = bnb.nn.Params4bit(value, requires_grad=False, **p.__dict__).to(device)
            elif isinstance(p, bnb.nn.Int8Params) and pname == "weight":
                kwargs = {k: v for k, v in p.__dict__.items() if k != "SCB"}
                value = random_tensor(self.seed, full, p.shape, self.std, compute_dtype())
                new = bnb.nn.Int8Params(value, requires_grad=False, **kwargs).to(device)
            elif p.dim() == 3 and pname in ("gate_up_proj", "down_proj"):
                new = nn.Parameter(self.fused(full, p.shape, p.dtype, device), requires_grad=False)
            else:
                new = nn.Parameter(initial_value(module, pname, full, p, self.seed, self.std, device),
                                   requires_grad=False)
            module._parameters[pname] = new
            self.done[id(p)] = (p, new)
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.device.type == "meta":
                raise RuntimeError(f"buffer {name}.{bname} was not computed when the model was built")
            module._buffers[bname] = b.to(device)

    def fused(self, full: str, shape, dtype, device) -> torch.Tensor:
        """A fused (E, out, in) expert tensor, each expert's slice drawn from its own stream."""
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        for e in range(shape[0]):
            out[e] = random_tensor(self.seed, f"{full}.{e}", shape[1:], self.std, dtype, device)
        return out

    def split(self, name: str, fused: nn.Module, device) -> None:
        """Replace a fused experts module by per-expert NF4 layers, each from its expert's float16 slice."""
        from .fused_experts import SplitExperts
        from .quantize import linear4bit

        split = SplitExperts.empty_like(fused, compute_dtype())
        for pname in ("gate_up_proj", "down_proj"):
            shape = getattr(fused, pname).shape
            layers = (linear4bit(random_tensor(self.seed, f"{name}.{pname}.{e}", shape[1:], self.std), compute_dtype(),
                                 device) for e in range(shape[0]))
            setattr(split, pname, nn.ModuleList(layers))
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, split)


def _units(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """unit -> its modules (those holding parameters or buffers directly), in the model's order."""
    layers_path = layers_path_of(model)
    units: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        tensors = [n for n, _ in module.named_parameters(recurse=False)]
        tensors += [n for n, _ in module.named_buffers(recurse=False)]
        if tensors:
            unit = placement_unit(f"{name}.{tensors[0]}" if name else tensors[0], layers_path)
            units.setdefault(unit, []).append((name, module))
    return units


def materialise(model: nn.Module, device_map: dict, seed: int, std: float, quantize: str, split_experts: bool,
                progress: LoadProgress) -> None:
    from .fused_experts import _release_free_memory, is_fused_experts

    units = _units(model)
    worker = _Materialiser(model, seed, std, split_experts and quantize == "int4")
    progress.stage(f"building random {quantize} weights (seed {seed})", total=len(units), unit="layers")
    for unit, modules in units.items():
        device = device_map.get(unit, device_map.get("", "cpu"))
        device = f"cuda:{device}" if isinstance(device, int) else device
        for name, module in modules:
            if worker.split_experts and is_fused_experts(module):
                worker.split(name, module, device)
            else:
                worker.module(name, module, device)
        _release_free_memory()  # the float16 drafts of this unit's layers go back to the OS
        progress.advance()


# ----------------------------------------------------------------------------- the build


def build_random(spec: str, quantize: str, devices: list, budget: int | None, seed: int = DEFAULT_SEED,
                 attn_implementation: str = "sdpa", progress: LoadProgress | None = None) -> dict:
    """The ``random:`` spec's architecture with seeded random weights, as the fields of a ``LoadedModel``
    (``checkpoints.load_model`` makes it one).

    devices: where to place it ([] = the CPU); budget: bytes per device for the plan (checked on the CPU too,
    against ``budget`` when given, so a model that cannot fit fails before anything is built).
    """
    from ..families import family_for

    progress = progress or current_progress(str(spec))
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    progress.stage("reading the config")
    path = random_config_path(spec)
    config = load_config(path)  # an unknown architecture fails here, naming the supported ones
    family = family_for(config)
    progress.stage("building the model on the meta device")
    model = build_on_meta(config, dtype=model_dtype(quantize), attn_implementation=attn_implementation)
    plan = _plan(model, devices or ["cpu"], budget, quantize)
    device_map = dict(plan.device_map) if devices else {"": "cpu"}
    log.info("building random %s (%s, seed %d) from %s:\n%s", family.name, quantize, seed, path, plan.table())
    if quantize in ("int4", "int8"):
        _swap_in_bnb_layers(model, quantize, family)
    materialise(model, device_map, seed, initializer_range(config), quantize, getattr(family, "fused_experts", False),
                progress)
    model.eval()
    model.config._name_or_path = f"{RANDOM_PREFIX}{path}"
    if devices and len({str(d) for d in device_map.values()}) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)  # hooks that move activations between devices
    if devices:
        model.hf_device_map = device_map
    check_load(model, quantize, progress, family)
    progress.stage("building the tokenizer and processor")
    from .random_processor import build_processor, build_tokenizer

    processor = build_processor(config, family.name, build_tokenizer(config, family.name))
    return dict(model=model, processor=processor, model_id=f"random-{path.stem}", quantize=quantize,
                device_map=device_map, plan=plan if devices else None)


def _plan(model: nn.Module, devices: list, budget: int | None, quantize: str) -> Plan:
    """The device plan (exact bytes); on the CPU with no budget given, 90% of the memory available now
    (free plus reclaimable page cache, as psutil reads it)."""
    if budget is None:
        import psutil

        budget = int(psutil.virtual_memory().available * 0.9)
    return plan_device_map(model, devices, budget, quantize)  # PlanError (what is missing, what to do)


def _swap_in_bnb_layers(model: nn.Module, quantize: str, family) -> None:
    """Replace the layers an ordinary load quantizes by meta bitsandbytes layers, as transformers does."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from .quantize import quantization_config, skip_patterns

    qconfig = quantization_config(quantize, keep_16bit=getattr(family, "keep_16bit", None))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype())  # the new layers' biases: 16-bit, as a load casts them
    try:
        replace_with_bnb_linear(model, modules_to_not_convert=skip_patterns(model, getattr(family, "keep_16bit", None)),
                                quantization_config=qconfig)
    finally:
        torch.set_default_dtype(previous)
    model.config.quantization_config = qconfig
    setattr(model, "is_loaded_in_4bit" if quantize == "int4" else "is_loaded_in_8bit", True)

