"""The AutoGLM-Phone architecture: routing, capacity, memory, prefix attention, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from autoglm_app.seed import MultiModalConfig
from autoglm_app.modeling import AutoGLMConfig, AutoGLMForConditionalGeneration, AutoGLMRouter
from autoglm_app.modeling.modeling_autoglm import AutoGLMMoE
from autoglm_app.modeling.small import build_small
from autoglm_app.modeling.summary import total_parameters


def prompt_inputs(processor, n_images=1, text="What is this?"):
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
    text = processor.apply_chat_template(msgs)
    images = [Image.new("RGB", (64, 64), (200, 40 * i, 30)) for i in range(n_images)]
    enc = processor(text, images=images)
    return {k: v for k, v in enc.items() if k not in ("image_spans", "audio_spans")}, enc


def test_router_picks_exactly_top2_with_renormalised_weights():
    torch.manual_seed(0)
    router = AutoGLMRouter(hidden=16, num_experts=6, top_k=2, capacity_factor=0.0)
    probs, experts, weights, kept = router(torch.randn(50, 16))
    assert experts.shape == (50, 2) and weights.shape == (50, 2)
    assert (experts[:, 0] != experts[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    # g = softmax(W_g x + b_g): the chosen experts are the two largest gate values
    top = probs.topk(2, dim=-1).indices
    assert torch.equal(top, experts)
    assert kept.all()


def test_capacity_limit_drops_overflow_and_it_passes_through_the_residual():
    torch.manual_seed(0)
    cfg = AutoGLMConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        capacity_factor=1.0)
    moe = AutoGLMMoE(cfg)
    with torch.no_grad():  # every token prefers expert 0, then expert 1
        moe.router.classifier.weight.zero_()
        moe.router.classifier.bias.copy_(torch.tensor([4.0, 3.0, 0.0, 0.0]))
    x = torch.randn(1, 10, 16)
    probs, experts, weights, kept = moe.router(x.view(-1, 16))
    cap = moe.router.capacity(10)  # ceil(1.0 * 10 * 2 / 4) = 5
    assert cap == 5
    assert kept[:, 0].sum() == cap and kept[:, 1].sum() == cap
    assert kept[:5].all() and not kept[5:].any()  # earlier tokens keep their slots
    y = moe(x)
    assert torch.count_nonzero(y[0, 5:]) == 0  # fully dropped tokens add nothing: the residual carries them
    assert torch.count_nonzero(y[0, :5]) > 0


def test_memory_slots_change_outputs_and_state_carries_across_turns():
    model, processor = build_small(seed=1, memory_slots=4)
    plain, _ = build_small(seed=1)
    inputs, _ = prompt_inputs(processor)
    with torch.no_grad():
        # same weights except the memory: outputs differ when memory is on
        state = {k: v for k, v in model.state_dict().items() if "memory" not in k}
        plain.load_state_dict(state)
        with_mem = model(**inputs)
        without = plain(**inputs)
        assert not torch.allclose(with_mem.logits, without.logits, atol=1e-4)
        turn1 = model(**inputs)
        assert len(turn1.memory_state) == model.config.num_hidden_layers
        fresh = model(**inputs)
        carried = model(**inputs, memory_state=turn1.memory_state)
    assert not torch.allclose(carried.logits, fresh.logits, atol=1e-5)
    assert not torch.allclose(turn1.memory_state[0], model.model.layers[0].memory[None])


def test_prefix_attention_is_bidirectional_over_the_multimodal_span_only():
    def logits_with_last_patch_nudged(model, inputs, span):
        with torch.no_grad():
            x = model.model.embed(inputs["input_ids"], inputs["pixel_values"])
            nudged = x.clone()
            nudged[0, span.start + span.rows * span.cols - 1] += 1.0  # only the last patch's embedding
            base = model(input_ids=inputs["input_ids"], inputs_embeds=x, use_cache=False).logits
            after = model(input_ids=inputs["input_ids"], inputs_embeds=nudged, use_cache=False).logits
        return base, after

    model, processor = build_small(seed=2, prefix_bidirectional=True)
    inputs, enc = prompt_inputs(processor)
    span = enc["image_spans"][0]
    first_patch = span.start
    base, after = logits_with_last_patch_nudged(model, inputs, span)
    # the first patch sees the last patch (bidirectional prefix) ...
    assert not torch.allclose(base[0, first_patch], after[0, first_patch], atol=1e-6)
    # ... while text before the image still cannot see it
    assert torch.allclose(base[0, :first_patch], after[0, :first_patch], atol=1e-6)

    causal, _ = build_small(seed=2)
    base, after = logits_with_last_patch_nudged(causal, inputs, span)
    assert torch.allclose(base[0, first_patch], after[0, first_patch], atol=1e-6)


def test_kv_cache_decoding_matches_full_forward():
    model, processor = build_small(seed=3)
    inputs, _ = prompt_inputs(processor)
    with torch.no_grad():
        full = model(**inputs, use_cache=False).logits
        T = inputs["input_ids"].shape[1]
        prefix = {**inputs, "input_ids": inputs["input_ids"][:, : T - 3], "attention_mask": None}
        out = model(**prefix)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(T - 3, T):
            out = model(input_ids=inputs["input_ids"][:, t : t + 1], past_key_values=cache)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, T - 4 : T], atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip_through_auto_classes(tmp_path):
    model, processor = build_small(seed=4)
    inputs, _ = prompt_inputs(processor, n_images=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "autoglm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_summary_lists_every_part_and_counts_all_parameters():
    model, _ = build_small(seed=5)
    text = model.summary()
    for part in ("vision_tower", "audio_tower", "adapter.vision", "adapter.audio", "embed_tokens",
                 "layers.0.attention", "layers.0.router", "layers.0.experts", "lm_head"):
        assert part in text
    total = sum(p.numel() for p in model.parameters())
    assert total_parameters(model) == total
    assert f"{total:,}" in text.splitlines()[-1]


def test_placeholder_count_mismatch_is_a_clear_error():
    _, processor = build_small(seed=6)
    with pytest.raises(ValueError, match="image placeholders"):
        processor("<|image|><|image|> two?", images=[Image.new("RGB", (8, 8))])


def test_audio_tokens_line_up_with_the_audio_encoder():
    model, processor = build_small(seed=7)
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "hi"}]}]
    audio = (np.random.default_rng(0).standard_normal(16000 * 2 + 123) * 0.1).astype(np.float32)
    enc = processor(processor.apply_chat_template(msgs), audios=[audio])
    assert enc["audio_spans"][0].frames == model.config.audio_tokens(len(audio)) == 51
    with torch.no_grad():
        model(**{k: v for k, v in enc.items() if k not in ("image_spans", "audio_spans")})


def test_seed_api_multimodal_config_maps_to_autoglm_fields():
    cfg = MultiModalConfig(vision_encoder="vit-tiny", audio_encoder="qwenaudio-lite", text_decoder="glm-tiny",
                           quantize="int4", overrides={"image_size": 64, "vision_depth": 1})
    config = AutoGLMConfig(**cfg.to_autoglm_kwargs())
    assert config.timm_vision_name == "vit_tiny_patch16_224"
    model = AutoGLMForConditionalGeneration(config)
    assert len(model.moe_blocks()) == config.num_hidden_layers
    with pytest.raises(ValueError, match="text_decoder"):
        MultiModalConfig(text_decoder="nope").to_autoglm_kwargs()


def test_seed_api_from_pretrained_loads_int4_and_prints_summary(tmp_path):
    from autoglm_app.modeling.small import save_small
    from autoglm_app.seed import AutoGLMModel

    save_small(str(tmp_path))
    config = MultiModalConfig(vision_encoder="vit-tiny", audio_encoder="qwenaudio-lite", text_decoder="glm-tiny",
                              quantize="int4")
    model = AutoGLMModel.from_pretrained(str(tmp_path), config=config)
    text = model.summary()
    assert "nf4" in text and "layers.0.experts" in text
    assert AutoGLMModel.from_config(config).config.num_experts == 4
