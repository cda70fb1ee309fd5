"""Tiny random-weight checkpoints of real architectures, built locally (no downloads).

Each builder saves a model from its real config class, with its real processor classes and a
byte-level BPE tokenizer trained here that holds the family's special tokens and a chat
template with an ``enable_thinking`` switch, to a directory the app's loader can read.
"""

from __future__ import annotations

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
                 "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>", "<think>", "</think>"]
GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<|video|>", "<think>", "</think>", "<answer>", "</answer>"]

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
OMNI25_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>",
                   "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>", "<think>", "</think>"]
# Qwen2.5-Omni's template: audio and images wrapped in bos / eos markers, no thinking switch
OMNI25_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c.type == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"  # GLM-4.1V-Thinking ignores enable_thinking
)


def build_tokenizer(specials: list[str], eos: str, pad: str, template: str, **named_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a red circle left of a blue square", "the answer is yes", "what is in the image?",
              "I think the shape is round", "hello world"] * 4
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # named tokens (image_token="<|IMAGE|>", ...) become tokenizer attributes, as the Omni processors expect
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, **named_tokens)
    fast.chat_template = template
    return fast


def _save(model, processor, path):
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def qwen_image_processor(cls=None):
    from transformers import Qwen2VLImageProcessor

    cls = cls or Qwen2VLImageProcessor
    # 14-px patches, merge 2: a 56x84 image -> grid 4x6 patches -> 2x3 merged tokens
    return cls(min_pixels=28 * 28, max_pixels=56 * 84, patch_size=14, merge_size=2, temporal_patch_size=2)


def build_qwen2_5_vl(path, seed: int = 0) -> str:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers import Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    tok = build_tokenizer(QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                max_position_embeddings=512)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=28, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"])
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = Qwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    return _save(model, processor, path)


def build_glm4v(path, seed: int = 0) -> str:
    """GLM-4.1V-Thinking / AutoGLM-Phone-9B architecture, tiny."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessor, Glm4vProcessor
    from transformers import Glm4vVideoProcessor

    torch.manual_seed(seed)
    tok = build_tokenizer(GLM_SPECIALS, "<|endoftext|>", "<|endoftext|>", GLM_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "partial_rotary_factor": 0.5},
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=28)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                         video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"])
    model = Glm4vForConditionalGeneration(config)
    processor = Glm4vProcessor(image_processor=qwen_image_processor(Glm4vImageProcessor), tokenizer=tok,
                               video_processor=Glm4vVideoProcessor(), chat_template=GLM_TEMPLATE)
    return _save(model, processor, path)


def build_qwen3_vl_moe(path, seed: int = 0, layers: int = 2, experts: int = 4) -> str:
    from transformers import Qwen2VLImageProcessor, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    torch.manual_seed(seed)
    tok = build_tokenizer(QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen3VLMoeForConditionalGeneration(config)
    improc = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96, patch_size=16, merge_size=2,
                                   temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=improc, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=QWEN_TEMPLATE)
    return _save(model, processor, path)


def script_logits(model, token_ids: list[int]) -> None:
    """Steer a random model's output head so it emits ``token_ids`` in order (then keeps the last one).

    The whole forward still runs (int4 layers, probes); only the final logits are biased, so a test can
    check what the engine makes of a known stream: a think block, then an answer.
    """
    head = model.get_output_embeddings()
    state = {"step": 0}

    def hook(module, args, out):
        i = min(state["step"], len(token_ids) - 1)
        state["step"] += 1
        out = out.clone()
        out[..., token_ids[i]] += 3e4
        return out

    head.register_forward_hook(hook)
    return state


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                    "<|notimestamps|>", "<|nocaptions|>", "<|startoflm|>", "<|startofprev|>"]


def build_whisper(path, seed: int = 0) -> str:
    """A tiny random Whisper (speech-to-text plumbing only: its transcript is arbitrary text)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers import WhisperProcessor, WhisperTokenizerFast

    torch.manual_seed(seed)
    fast = build_tokenizer(WHISPER_SPECIALS, "<|endoftext|>", "<|endoftext|>", QWEN_TEMPLATE)
    fast.save_pretrained(path)
    tok = WhisperTokenizerFast.from_pretrained(path, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                               unk_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64,
                           decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                           begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = ids["<|startoftranscript|>"]
    model.generation_config.forced_decoder_ids = None
    model.generation_config.no_timestamps_token_id = ids["<|notimestamps|>"]
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok)
    return _save(model, processor, path)


def build_qwen3_vl(path, seed: int = 0) -> str:
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    torch.manual_seed(seed)
    tok = build_tokenizer(QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen3VLForConditionalGeneration(config)
    improc = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96, patch_size=16, merge_size=2,
                                   temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=improc, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=QWEN_TEMPLATE)
    return _save(model, processor, path)


def build_glm4v_moe(path, seed: int = 0) -> str:
    """GLM-4.5V architecture, tiny: layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE with fused experts."""
    from transformers import Glm4vImageProcessor, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
    from transformers import Glm4vProcessor, Glm4vVideoProcessor

    torch.manual_seed(seed)
    tok = build_tokenizer(GLM_SPECIALS, "<|endoftext|>", "<|endoftext|>", GLM_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in GLM_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                n_group=1, topk_group=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "partial_rotary_factor": 0.5},
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=28)
    config = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                            video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                            image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                            video_end_token_id=ids["<|end_of_video|>"])
    model = Glm4vMoeForConditionalGeneration(config)
    processor = Glm4vProcessor(image_processor=qwen_image_processor(Glm4vImageProcessor), tokenizer=tok,
                               video_processor=Glm4vVideoProcessor(), chat_template=GLM_TEMPLATE)
    return _save(model, processor, path)


# ----------------------------------------------------------------------------- Qwen-Omni (thinker + talker checkpoints)


def _as_full_omni_checkpoint(path) -> None:
    """Make a saved ``enable_audio_output=False`` Omni model look like a released one: the config says the
    talker is there and the weights file holds talker / token2wav tensors next to the ``thinker.`` ones."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["enable_audio_output"] = True
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    assert all(k.startswith("thinker.") for k in tensors), "expected the thinker's weights under thinker."
    tensors["talker.model.embed_tokens.weight"] = torch.randn(32, 16)
    tensors["talker.codec_head.weight"] = torch.randn(32, 16)
    save_file(tensors, weights, metadata={"format": "pt"})


def build_qwen2_5_omni(path, seed: int = 0, full: bool = True) -> str:
    """Qwen2.5-Omni, tiny: the whole-model config (thinker + talker + token2wav) with the thinker's weights under
    ``thinker.`` (plus stand-in talker weights), Qwen2.5-Omni's processor with a 80-bin WhisperFeatureExtractor.
    ``full=False`` saves a thinker-only checkpoint (model_type ``qwen2_5_omni_thinker``) instead."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    torch.manual_seed(seed)
    tok = build_tokenizer(OMNI25_SPECIALS, "<|im_end|>", "<|endoftext|>", OMNI25_TEMPLATE,
                          image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
                          vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                          audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in OMNI25_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=28, fullatt_block_indexes=[0])
    audio = dict(num_mel_bins=80, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                 output_dim=64, n_window=50, max_source_positions=1500)
    thinker = dict(text_config=text, vision_config=vision, audio_config=audio, audio_token_index=ids["<|AUDIO|>"],
                   image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
                   audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
                   vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"])
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    model = Qwen2_5OmniForConditionalGeneration(config)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=5)  # pads to 5 s, not 30
    processor = Qwen2_5OmniProcessor(image_processor=qwen_image_processor(), video_processor=Qwen2VLVideoProcessor(),
                                     feature_extractor=feature_extractor, tokenizer=tok, chat_template=OMNI25_TEMPLATE)
    if not full:
        return _save(model.thinker, processor, path)
    _save(model, processor, path)
    _as_full_omni_checkpoint(path)
    return str(path)


def build_qwen3_omni_moe(path, seed: int = 0, layers: int = 2, experts: int = 4) -> str:
    """Qwen3-Omni-30B-A3B architecture, tiny: whole-model config, thinker weights under ``thinker.`` (per-expert,
    as released; transformers fuses them into 3-D experts on load), Qwen3-Omni's processor with a 128-bin
    WhisperFeatureExtractor, and a template with the ``enable_thinking`` switch."""
    from transformers import Qwen2VLImageProcessor, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
    from transformers import Qwen3OmniMoeProcessor, Qwen3VLVideoProcessor, WhisperFeatureExtractor

    torch.manual_seed(seed)
    tok = build_tokenizer(QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", QWEN_TEMPLATE,
                          image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
                          vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
                          audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "interleaved": True},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    audio = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                 output_dim=64, n_window=50, n_window_infer=800, conv_chunksize=500, downsample_hidden_size=8)
    thinker = dict(text_config=text, vision_config=vision, audio_config=audio, audio_token_id=ids["<|audio_pad|>"],
                   image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   audio_start_token_id=ids["<|audio_start|>"], vision_start_token_id=ids["<|vision_start|>"])
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
    model = Qwen3OmniMoeForConditionalGeneration(config)
    improc = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 96, patch_size=16, merge_size=2,
                                   temporal_patch_size=2)
    processor = Qwen3OmniMoeProcessor(image_processor=improc, video_processor=Qwen3VLVideoProcessor(),
                                      feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                                      chat_template=QWEN_TEMPLATE)
    _save(model, processor, path)
    _as_full_omni_checkpoint(path)
    return str(path)
