"""The AutoGLM-Phone model, read top to bottom.

vision:  image --timm ViT--> (rows*cols, Dv) patch features
speech:  log-mel (n_mels, T) --2 stride-2 convs + transformer--> (T/4, Da) frames
adapter: low-rank (rank r) projections of both into the decoder width
decoder: GLM-style blocks (RMSNorm, rotary, grouped-query attention) whose
         feed-forward is a top-k gated Mixture of Experts; optional bidirectional
         attention over the multimodal prefix and optional learned memory slots.

Placeholder tokens (``image_token_id`` / ``audio_token_id``) in ``input_ids`` mark
where the projected features go: one placeholder per patch or audio frame.

Two seams exist for the engine's probes, and nothing else here knows about them:
``AutoGLMAttention.focus_probe`` (called with the post-rotary queries and keys) and
``AutoGLMRouter`` (a module whose forward output a hook can read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from .configuration_autoglm import AutoGLMConfig

# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin of shape (B, 1, T, rotary_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, rotary_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (B, H, T, D); GLM rotates part of the head."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat([x_rot, x_pass], dim=-1)


class SwiGLU(nn.Module):
    """One feed-forward expert (or the dense MLP): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- attention


class AutoGLMAttention(nn.Module):
    def __init__(self, config: AutoGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        # Set by the engine's focus probe: fn(layer_idx, q, k, mask, probs_or_None, n_memory).
        self.focus_probe = None

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None, memory: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        n_mem = 0
        if memory is not None:  # memory slots: extra keys/values every query may read, no rotary
            n_mem = memory.shape[1]
            mem = memory.to(x.dtype)
            mk = self.k_proj(mem).view(B, n_mem, self.n_kv, self.head_dim).transpose(1, 2)
            mv = self.v_proj(mem).view(B, n_mem, self.n_kv, self.head_dim).transpose(1, 2)
            k, v = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
        q = q.to(k.dtype)

        probs = None
        if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
            kr = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            vr = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            scores = (q @ kr.transpose(-1, -2)).float() * self.scale  # (B, H, T, S)
            if mask is None and T > 1:
                mask = _causal_mask(T, k.shape[2], x.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1)
            y = probs.to(vr.dtype) @ vr
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale, enable_gqa=True
            )
        if self.focus_probe is not None:
            self.focus_probe(self.layer_idx, q, k, mask, probs, n_mem)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y.to(x.dtype))


def _causal_mask(T: int, S: int, device) -> torch.Tensor:
    """Bool (1, 1, T, S): the T newest queries see every key up to their own position."""
    past = S - T
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]


# ----------------------------------------------------------------------------- mixture of experts


class AutoGLMRouter(nn.Module):
    """Dynamic routing gate: g = softmax(W_g x + b_g), top-k, weights renormalised.

    Returns (probs (N, E), experts (N, k), weights (N, k), kept (N, k)). ``kept`` is
    False where the expert's capacity was full; that assignment is dropped and the
    token passes through the residual for it. Forward hooks on this module are how
    routing statistics are collected.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, capacity_factor: float):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.classifier = nn.Linear(hidden, num_experts, bias=True)

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, rows: int = 1, real: torch.Tensor | None = None):
        """x (N, C): ``rows`` sequences of N / rows tokens each, back to back; ``real`` (N,) bool marks the tokens
        that are not padding (None: all are). Capacity is per sequence, counted over its real tokens, and padding
        claims none: a sequence is routed the same alone or in a padded batch (the engine prefills several
        requests together and must give each the tokens it would get alone)."""
        probs = self.classifier(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        kept = torch.ones_like(experts, dtype=torch.bool)
        if real is not None:
            kept &= real[:, None]
        if self.capacity_factor > 0:
            # First choices claim slots before second choices; earlier tokens first within a choice.
            T = x.shape[0] // rows
            counted = real.view(rows, T).sum(1) if real is not None else torch.full((rows,), T, device=x.device)
            cap = torch.ceil(self.capacity_factor * counted.double() * self.top_k / self.num_experts)  # (rows,)
            used = torch.zeros(rows, 1, self.num_experts, dtype=torch.long, device=x.device)
            for slot in range(self.top_k):
                onehot = F.one_hot(experts[:, slot], self.num_experts)
                if real is not None:
                    onehot = onehot * real[:, None]
                onehot = onehot.view(rows, T, -1)
                position = onehot.cumsum(1) - 1 + used  # (rows, T, E)
                mine = position.gather(2, experts[:, slot].view(rows, T, 1)).view(rows, T)
                kept[:, slot] &= (mine < cap[:, None]).view(-1)
                used = used + onehot.sum(1, keepdim=True)
        return probs, experts, weights, kept


class AutoGLMMoE(nn.Module):
    """Top-k MoE feed-forward; one nn.Linear per expert projection so 4-bit covers every expert."""

    def __init__(self, config: AutoGLMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = AutoGLMRouter(
            config.hidden_size, config.num_experts, config.num_experts_per_tok, config.capacity_factor
        )
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.aux_loss = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); ``token_mask`` (B, T) bool, False at padding (see ``AutoGLMRouter.forward``)."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        real = token_mask.reshape(-1).to(x.device) if token_mask is not None else None
        probs, experts, weights, kept = self.router(flat, B, real)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((experts == e) & kept)
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        # Importance (load-balancing) loss: E * sum_e f_e * P_e, minimal (= 1) when balanced.
        frac = F.one_hot(experts, self.num_experts).float().sum((0, 1)) / experts.numel()
        self.aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        return out.view(B, T, C)


# ----------------------------------------------------------------------------- decoder layer


class AutoGLMDecoderLayer(nn.Module):
    def __init__(self, config: AutoGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = AutoGLMAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx in config.moe_layers:
            self.mlp = AutoGLMMoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        if config.memory_slots:
            # Learned memory: the slots' initial state and how fast they follow the layer output.
            self.memory = nn.Parameter(torch.zeros(config.memory_slots, config.hidden_size))
            self.memory_gate = nn.Parameter(torch.tensor(-2.0))
        else:
            self.memory = None

    def forward(self, x, cos, sin, mask, past_key_values, memory_state, token_mask):
        memory = None
        if self.memory is not None:
            memory = self.memory[None].expand(x.shape[0], -1, -1) if memory_state is None else memory_state
            memory = memory.to(x.device)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values, memory)
        h = self.post_attention_layernorm(x)
        x = x + (self.mlp(h, token_mask) if isinstance(self.mlp, AutoGLMMoE) else self.mlp(h))
        new_memory = None
        if memory is not None:
            new_memory = self.update_memory(memory, x, token_mask)
        return x, new_memory

    def update_memory(self, memory: torch.Tensor, h: torch.Tensor, token_mask: torch.Tensor | None):
        """Each slot reads the tokens of this forward and moves towards what it read."""
        mem, hh = memory.float(), h.float()
        scores = F.normalize(mem, dim=-1) @ F.normalize(hh, dim=-1).transpose(1, 2) * math.sqrt(mem.shape[-1])
        if token_mask is not None:
            scores = scores.masked_fill(~token_mask[:, None, :].to(scores.device), float("-inf"))
        read = scores.softmax(-1) @ hh
        gate = torch.sigmoid(self.memory_gate.float())
        return (mem + gate * (read - mem)).to(memory.dtype)


# ----------------------------------------------------------------------------- encoders and adapter


class AutoGLMVisionTower(nn.Module):
    """A timm ViT, returning the patch tokens (prefix tokens removed) in row-major grid order."""

    def __init__(self, config: AutoGLMConfig):
        super().__init__()
        kwargs = dict(pretrained=False, num_classes=0, img_size=config.image_size, patch_size=config.patch_size)
        for key, value in (
            ("depth", config.vision_depth),
            ("embed_dim", config.vision_embed_dim),
            ("num_heads", config.vision_num_heads),
        ):
            if value:
                kwargs[key] = value
        self.vit = timm.create_model(config.timm_vision_name, **kwargs)
        self.embed_dim = self.vit.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vit.forward_features(pixel_values)
        return feats[:, self.vit.num_prefix_tokens :]


class AutoGLMAudioTower(nn.Module):
    """Convolutional subsampling (x4, 40 ms per frame) + transformer encoder over log-mel."""

    def __init__(self, config: AutoGLMConfig):
        super().__init__()
        D = config.audio_hidden_size
        self.conv1 = nn.Conv1d(config.num_mel_bins, D, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(D, D, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                D, config.audio_heads, 4 * D, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(config.audio_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.embed_dim = D

    @staticmethod
    def sinusoids(T: int, D: int, device) -> torch.Tensor:
        pos = torch.arange(T, device=device).float()[:, None]
        inv = torch.exp(-math.log(10000.0) * torch.arange(0, D, 2, device=device).float() / D)
        return torch.cat([torch.sin(pos * inv), torch.cos(pos * inv)], dim=-1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """features (N, n_mels, T_max), lengths (N,) mel frames -> one (frames_i, D) per recording."""
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, T', D)
        out_len = lengths
        for _ in range(2):
            out_len = (out_len - 1) // 2 + 1
        x = x + self.sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= out_len.to(x.device)[:, None]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad if pad.any() else None)
        x = self.norm(x)
        return [x[i, : int(n)] for i, n in enumerate(out_len)]


class LowRankProjector(nn.Module):
    """in -> LayerNorm -> rank r -> GELU -> decoder width."""

    def __init__(self, in_dim: int, rank: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(x))))


class AutoGLMAdapter(nn.Module):
    def __init__(self, config: AutoGLMConfig, vision_dim: int, audio_dim: int):
        super().__init__()
        self.vision = LowRankProjector(vision_dim, config.adapter_rank, config.hidden_size)
        self.audio = LowRankProjector(audio_dim, config.adapter_rank, config.hidden_size)


# ----------------------------------------------------------------------------- pretrained base


@dataclass
class AutoGLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    memory_state: list[torch.Tensor] | None = None
    hidden_states: torch.Tensor | None = None


class AutoGLMPreTrainedModel(PreTrainedModel):
    config_class = AutoGLMConfig
    config: AutoGLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["AutoGLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AutoGLMDecoderLayer) and module.memory is not None:
            init.normal_(module.memory, mean=0.0, std=self.config.initializer_range)
            init.constant_(module.memory_gate, -2.0)
        elif isinstance(module, AutoGLMVisionTower):
            for name in ("cls_token", "pos_embed", "reg_token"):
                param = getattr(module.vit, name, None)
                if isinstance(param, nn.Parameter):
                    init.normal_(param, mean=0.0, std=self.config.initializer_range)


class AutoGLMBackbone(AutoGLMPreTrainedModel):
    """Encoders, adapter, embeddings and decoder blocks; returns final hidden states."""

    def __init__(self, config: AutoGLMConfig):
        super().__init__(config)
        self.vision_tower = AutoGLMVisionTower(config)
        self.audio_tower = AutoGLMAudioTower(config)
        self.adapter = AutoGLMAdapter(config, self.vision_tower.embed_dim, self.audio_tower.embed_dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(AutoGLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor) // 2 * 2
        self.post_init()

    # -- multimodal embedding
    def embed(self, input_ids, pixel_values=None, audio_features=None, audio_feature_lengths=None):
        x = self.embed_tokens(input_ids)
        image_slots = input_ids == self.config.image_token_id
        if image_slots.any():
            if pixel_values is None:
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            feats = self.adapter.vision(self.vision_tower(pixel_values.to(self.vision_dtype())))
            feats = feats.reshape(-1, feats.shape[-1])
            if feats.shape[0] != int(image_slots.sum()):
                raise ValueError(f"{int(image_slots.sum())} image placeholders for {feats.shape[0]} patch features")
            x = x.masked_scatter(image_slots[..., None].to(x.device), feats.to(x.device, x.dtype))
        audio_slots = input_ids == self.config.audio_token_id
        if audio_slots.any():
            if audio_features is None:
                raise ValueError("input_ids hold audio placeholders but no audio_features were given")
            if audio_feature_lengths is None:
                audio_feature_lengths = torch.full((audio_features.shape[0],), audio_features.shape[-1])
            frames = self.audio_tower(audio_features, audio_feature_lengths.to(audio_features.device))
            feats = self.adapter.audio(torch.cat(frames, dim=0))
            if feats.shape[0] != int(audio_slots.sum()):
                raise ValueError(f"{int(audio_slots.sum())} audio placeholders for {feats.shape[0]} audio frames")
            x = x.masked_scatter(audio_slots[..., None].to(x.device), feats.to(x.device, x.dtype))
        return x

    def vision_dtype(self) -> torch.dtype:
        return self.vision_tower.vit.patch_embed.proj.weight.dtype

    # -- attention mask: None means plain causal (the fast path)
    def build_mask(self, input_ids, attention_mask, past_len: int, n_mem: int):
        B, T = input_ids.shape
        device = input_ids.device
        prefix = None
        if self.config.prefix_bidirectional and T > 1:
            mm = (input_ids == self.config.image_token_id) | (input_ids == self.config.audio_token_id)
            if mm.any():
                prefix = mm
        padded = attention_mask is not None and not bool(attention_mask.all())
        # None lets SDPA apply is_causal, whose triangle is aligned top-left: right only without a cache; several
        # new tokens over a cache (a teacher-forced continuation) need the mask that lets them see the past
        if prefix is None and not padded and n_mem == 0 and (past_len == 0 or T == 1):
            return None
        S = past_len + T
        allowed = _causal_mask(T, S, device).expand(B, 1, T, S).clone()
        if prefix is not None:
            # GLM prefix attention: the span from the first to the last multimodal token is bidirectional.
            idx = torch.arange(T, device=device)
            big = torch.full_like(idx, T)
            first = torch.where(prefix, idx, big).min(dim=1).values
            last = torch.where(prefix, idx, -1).max(dim=1).values
            inside = (idx[None] >= first[:, None]) & (idx[None] <= last[:, None])  # (B, T)
            block = inside[:, :, None] & inside[:, None, :]
            allowed[:, 0, :, past_len:] |= block
        if padded:
            keys = attention_mask[:, -S:].bool().to(device)
            allowed &= keys[:, None, None, :]
            allowed[:, 0, torch.arange(T), past_len + torch.arange(T)] = True  # never an empty row
        if n_mem:
            allowed = torch.cat([torch.ones(B, 1, T, n_mem, dtype=torch.bool, device=device), allowed], dim=-1)
        return allowed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        pixel_values=None,
        audio_features=None,
        audio_feature_lengths=None,
        memory_state: list[torch.Tensor] | None = None,
        use_cache: bool = True,
        inputs_embeds=None,
    ):
        x = inputs_embeds if inputs_embeds is not None else self.embed(
            input_ids, pixel_values, audio_features, audio_feature_lengths
        )
        B, T, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None].expand(B, -1)
        cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.config.rope_theta, x.dtype)
        mask = self.build_mask(input_ids, attention_mask, past_len, self.config.memory_slots)
        token_mask = attention_mask[:, -T:].bool() if attention_mask is not None else None
        new_memory = []
        for i, layer in enumerate(self.layers):
            x, mem = layer(
                x,
                cos.to(x.device),
                sin.to(x.device),
                mask.to(x.device) if mask is not None else None,
                past_key_values,
                memory_state[i] if memory_state is not None else None,
                token_mask,
            )
            new_memory.append(mem)
        x = self.norm(x)
        return x, past_key_values, (new_memory if self.config.memory_slots else None)


class AutoGLMForConditionalGeneration(AutoGLMPreTrainedModel, GenerationMixin):
    """AutoGLM-Phone with its language-model head: the class the app loads."""

    def __init__(self, config: AutoGLMConfig):
        super().__init__(config)
        self.model = AutoGLMBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def moe_blocks(self) -> list[tuple[int, AutoGLMMoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, AutoGLMMoE)]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        memory_state: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> AutoGLMOutput:
        if use_cache is None:
            use_cache = labels is None
        hidden, cache, memory = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            pixel_values=pixel_values,
            audio_features=audio_features,
            audio_feature_lengths=audio_feature_lengths,
            memory_state=memory_state,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.device)).float()
        aux = [moe.aux_loss.to(logits.device) for _, moe in self.moe_blocks() if moe.aux_loss is not None]
        aux_loss = torch.stack(aux).mean() if aux else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return AutoGLMOutput(
            loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=cache, memory_state=memory
        )

    # ------------------------------------------------------------------ summary

    def summary(self) -> str:
        """A table of sub-modules: parameters, dtype, device and bytes held (4-bit layers counted unpacked)."""
        from .summary import summarize

        return summarize(self)
