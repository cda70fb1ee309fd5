"""AutoGLMConfig: every architectural choice of the AutoGLM-Phone model family."""

from __future__ import annotations

from transformers import PretrainedConfig

# Short names the seed API uses for the timm vision towers.
VISION_ALIASES = {
    "vit-tiny": "vit_tiny_patch16_224",
    "vit-small": "vit_small_patch16_224",
    "vit-base": "vit_base_patch16_224",
    "vit-large": "vit_large_patch14_224",
}


class AutoGLMConfig(PretrainedConfig):
    """Configuration of an AutoGLM-Phone model.

    Vision: a timm ViT (``vision_model``) on ``image_size`` px images cut into
    ``patch_size`` px patches, so each image becomes a (rows x cols) grid of
    ``(image_size // patch_size) ** 2`` tokens.
    Speech: a log-mel front end (16 kHz, 25 ms window, 10 ms hop, ``num_mel_bins``)
    and an audio encoder (two stride-2 convolutions, then transformer layers), so
    one audio token covers 40 ms.
    Adapter: rank-``adapter_rank`` projections of both into the decoder width.
    Decoder: GLM-style (RMSNorm, rotary, GQA, SwiGLU) with top-k MoE feed-forward
    layers (``moe_layers``), optional bidirectional attention over the multimodal
    prefix and optional learned memory slots.
    """

    model_type = "autoglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        # decoder
        vocab_size: int = 1024,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int = 256,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        max_position_embeddings: int = 8192,
        attention_bias: bool = True,
        prefix_bidirectional: bool = False,
        memory_slots: int = 0,
        # mixture of experts
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 128,
        moe_layers: list[int] | None = None,
        capacity_factor: float = 0.0,
        router_aux_loss_coef: float = 0.01,
        # vision
        vision_model: str = "vit-tiny",
        image_size: int = 224,
        patch_size: int = 16,
        vision_depth: int | None = None,
        vision_embed_dim: int | None = None,
        vision_num_heads: int | None = None,
        # speech
        sample_rate: int = 16000,
        num_mel_bins: int = 80,
        audio_hidden_size: int = 128,
        audio_layers: int = 2,
        audio_heads: int = 4,
        max_audio_seconds: float = 30.0,
        # adapter
        adapter_rank: int = 32,
        # special tokens
        image_token_id: int = 5,
        audio_token_id: int = 6,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int | list[int] = 2,
        tie_word_embeddings: bool = False,
        # caption-focus default aggregation: rule and layer range [start, end)
        focus_aggregation: str = "mean",
        focus_layers: list[int] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.prefix_bidirectional = prefix_bidirectional
        self.memory_slots = memory_slots
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_layers = list(range(num_hidden_layers)) if moe_layers is None else list(moe_layers)
        self.capacity_factor = capacity_factor
        self.router_aux_loss_coef = router_aux_loss_coef
        self.vision_model = vision_model
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_depth = vision_depth
        self.vision_embed_dim = vision_embed_dim
        self.vision_num_heads = vision_num_heads
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.audio_hidden_size = audio_hidden_size
        self.audio_layers = audio_layers
        self.audio_heads = audio_heads
        self.max_audio_seconds = max_audio_seconds
        self.adapter_rank = adapter_rank
        self.image_token_id = image_token_id
        self.audio_token_id = audio_token_id
        self.focus_aggregation = focus_aggregation
        self.focus_layers = focus_layers
        self.initializer_range = initializer_range
        if num_experts_per_tok > num_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_experts")
        if hidden_size % num_attention_heads and head_dim is None:
            raise ValueError("hidden_size must divide by num_attention_heads (or set head_dim)")
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def timm_vision_name(self) -> str:
        return VISION_ALIASES.get(self.vision_model, self.vision_model)

    @property
    def image_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def image_tokens(self) -> int:
        rows, cols = self.image_grid
        return rows * cols

    def audio_tokens(self, num_samples: int) -> int:
        """Audio tokens for a recording of ``num_samples`` samples at ``sample_rate``."""
        frames = num_samples // 160 + 1  # centred STFT, 10 ms hop
        for _ in range(2):  # two stride-2 convolutions (kernel 3, padding 1)
            frames = (frames - 1) // 2 + 1
        return frames
