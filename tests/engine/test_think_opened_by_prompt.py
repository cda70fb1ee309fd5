"""Thinking opened by the prompt: chat templates (Qwen3 Thinking-2507, QwQ, GLM-4.7) that end the rendered
prompt with ``<think>`` and a newline, so the output starts inside the reasoning and only closes it.

The splitter then starts in the reasoning; the families say so from the rendered text (``Prepared.thinking_open``);
the Engine, the API (streamed and not) and so the page see the reasoning apart from the answer, no tag in either.
With thinking switched off the template's own choice wins: a block it closes is an answer, one it opens is followed.
"""

from __future__ import annotations

import httpx
import pytest

from autoglm_app.config import Limits
from autoglm_app.engine.thinksplit import ThinkSplitter
from autoglm_app.engine.worker import Engine
from autoglm_app.events import Answer, ChatRequest, Message, Options, Reasoning
from autoglm_app.families.autoglm import AUTOGLM
from autoglm_app.families.hf import HF_FAMILIES
from autoglm_app.loading.checkpoints import load_model
from autoglm_app.modeling.processing_autoglm import CHAT_TEMPLATE
from autoglm_app.modeling.small import build_small
from tests import tiny_families as tiny
from tests.api_helpers import body, post, serve, sse_events
from tests.helpers import make_engine

OUTPUT = "reasoning text</think>answer"


def split(pieces: list[str], thinking: bool = True, opened: bool = False) -> tuple[str, str]:
    s = ThinkSplitter(thinking, opened=opened)
    out = [piece for p in pieces for piece in s.feed(p)] + s.finish()
    return ("".join(t for phase, t in out if phase == "reasoning"),
            "".join(t for phase, t in out if phase == "answer"))


# ----------------------------------------------------------------------------- the splitter


def test_an_opened_block_starts_in_the_reasoning_and_its_close_tag_ends_it():
    assert split([OUTPUT], opened=True) == ("reasoning text", "answer")


@pytest.mark.parametrize("cut", range(1, len(OUTPUT)))
def test_an_opened_block_splits_wherever_the_stream_is_cut(cut):
    assert split([OUTPUT[:cut], OUTPUT[cut:]], opened=True) == ("reasoning text", "answer")


def test_an_opened_block_split_character_by_character_keeps_no_tag():
    reasoning, answer = split(list("a < b, so </ is no tag\n</think>\n\nThe answer."), opened=True)
    assert (reasoning, answer) == ("a < b, so </ is no tag\n", "The answer.")


def test_an_opened_block_that_never_closes_is_all_reasoning():
    assert split(["still thinking", " when the budget ran o", "ut</thi"], opened=True) == (
        "still thinking when the budget ran out</thi", "")


def test_thinking_off_with_a_template_that_still_opens_the_block_follows_the_prompt():
    assert split([OUTPUT], thinking=False, opened=True) == ("reasoning text", "answer")


def test_thinking_off_with_a_template_that_closes_the_block_is_all_answer():
    assert split(["Red", "."], thinking=False, opened=False) == ("", "Red.")
    assert split(["<think></think>Red."], thinking=False, opened=False) == ("", "Red.")


def test_without_an_opened_block_the_output_still_opens_its_own():
    assert split(["<think>r</think>a"]) == ("r", "a")
    assert split([OUTPUT]) == ("", OUTPUT)  # nothing opened it: the close tag is answer text, as before


# ----------------------------------------------------------------------------- the families read the prompt


@pytest.mark.parametrize("prompt, opened", [
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),  # Qwen3 Thinking-2507, QwQ
    ("[gMASK]<sop><|user|>\nhi<|assistant|><think>", True),  # GLM-4.7
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking off: the template closed it
    ("<|im_start|>assistant\n", False),  # the model opens its own block, or none
    ("<|im_start|>user\nwhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n", False),  # a user's tag
])
def test_a_family_knows_whether_its_rendered_prompt_ends_inside_a_think_block(prompt, opened):
    assert AUTOGLM.opens_thinking(prompt) is opened
    assert HF_FAMILIES["qwen3_vl"].opens_thinking(prompt) is opened


# ----------------------------------------------------------------------------- a transformers family

# Qwen's tiny template, but the generation prompt opens the think block (Qwen3 Thinking-2507's shape)
QWEN_OPENING = tiny.QWEN_TEMPLATE.replace(
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}",
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}")
# a template that ignores the switch and always opens the block (Qwen3-VL-Thinking's shape)
QWEN_ALWAYS_OPENS = tiny.QWEN_TEMPLATE.replace(
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}", "<think>\n")


def use_template(processor, template: str) -> None:
    processor.chat_template = template
    processor.tokenizer.chat_template = template


def scripted_reply(processor, text: str) -> list[int]:
    """``text`` ("reasoning</think>answer") as token ids, then the end of the turn."""
    tok = processor.tokenizer
    reasoning, answer = text.split("</think>")
    return [*tok.encode(reasoning, add_special_tokens=False), tok.convert_tokens_to_ids("</think>"),
            *tok.encode(answer, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(engine, processor, script state) on a tiny Qwen2.5-VL whose template opens the think block."""
    loaded = load_model(tiny.build_qwen2_5_vl(tmp_path_factory.mktemp("qwen_opening")), quantize="fp32")
    use_template(loaded.processor, QWEN_OPENING)
    engine = Engine(loaded, Limits(context_limit=512))
    state = tiny.script_logits(loaded.model, scripted_reply(loaded.processor, OUTPUT))
    yield engine, loaded.processor, state
    engine.close()


def ask(engine, thinking: bool = True) -> tuple[str, str]:
    events = engine.run(ChatRequest([Message("user", "what is here?")],
                                    Options(max_new_tokens=40, temperature=0, enable_thinking=thinking)))
    assert events[-1].finish_reason == "stop"
    return ("".join(e.text for e in events if isinstance(e, Reasoning)),
            "".join(e.text for e in events if isinstance(e, Answer)))


def test_the_hf_family_marks_a_prompt_its_template_opens(qwen):
    engine, processor, _ = qwen
    on = engine.family.prepare(processor, [Message("user", "hi")], enable_thinking=True)
    off = engine.family.prepare(processor, [Message("user", "hi")], enable_thinking=False)
    assert processor.tokenizer.decode(on.inputs["input_ids"][0]).endswith("assistant\n<think>\n")
    assert on.thinking_open is True and off.thinking_open is False


def test_the_engine_streams_reasoning_then_the_answer_without_the_close_tag(qwen):
    engine, _, state = qwen
    state["step"] = 0
    assert ask(engine) == ("reasoning text", "answer")


def test_thinking_off_with_a_template_that_closes_the_block_is_all_answer_in_the_engine(qwen):
    engine, processor, state = qwen
    state["step"] = len(processor.tokenizer.encode("reasoning text", add_special_tokens=False)) + 1
    assert ask(engine, thinking=False) == ("", "answer")


def test_thinking_off_closes_a_block_the_template_always_opens_without_nesting_a_second(qwen):
    engine, processor, _ = qwen
    use_template(processor, QWEN_ALWAYS_OPENS)
    try:
        text = engine.family.render(processor, [{"role": "user", "content": "hi"}], enable_thinking=False)
        prep_on = engine.family.prepare(processor, [Message("user", "hi")], enable_thinking=True)
    finally:
        use_template(processor, QWEN_OPENING)
    assert text.endswith("<|im_start|>assistant\n<think>\n</think>\n\n") and text.count("<think>") == 1
    assert not engine.family.opens_thinking(text) and prep_on.thinking_open


@pytest.fixture(scope="module")
def qwen_url(qwen):
    running = serve(qwen[0])
    yield running.url
    running.stop()


def test_the_api_answer_holds_the_reasoning_apart(qwen, qwen_url):
    qwen[2]["step"] = 0
    r = post(qwen_url, body(messages=[{"role": "user", "content": "what is here?"}], max_tokens=40))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("reasoning text", "answer")


def test_the_api_stream_holds_the_reasoning_apart(qwen, qwen_url):
    qwen[2]["step"] = 0
    payload = body(messages=[{"role": "user", "content": "what is here?"}], max_tokens=40, stream=True)
    with httpx.stream("POST", qwen_url + "/v1/chat/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200
        chunks = [c for c in sse_events(r) if c != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    answer = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, answer) == ("reasoning text", "answer")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")] \
        == ["stop"]


# ----------------------------------------------------------------------------- AutoGLM's own template

# the project's template with the generation prompt opening the block when thinking is on
AUTOGLM_OPENING = CHAT_TEMPLATE.replace(
    "<think></think>{%- endif -%}", "<think></think>{%- else -%}<think>{{ '\\n' }}{%- endif -%}")


@pytest.fixture(scope="module")
def autoglm():
    model, processor = build_small(seed=0)
    processor.tokenizer.chat_template = AUTOGLM_OPENING
    engine = make_engine(model, processor, context_limit=256)
    tok = processor.tokenizer
    ids = [*tok.encode("reasoning text", add_special_tokens=False), tok.convert_tokens_to_ids("</think>"),
           *tok.encode("answer", add_special_tokens=False), tok.eos_token_id]
    state = tiny.script_logits(model, ids)
    yield engine, processor, state
    engine.close()


def test_autoglm_with_a_template_that_opens_thinking_splits_the_reasoning_off(autoglm):
    engine, processor, state = autoglm
    prep = engine.family.prepare(processor, [Message("user", "hi")], enable_thinking=True)
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|assistant|>\n<think>\n")
    assert prep.thinking_open is True
    state["step"] = 0
    assert ask(engine) == ("reasoning text", "answer")


def test_autoglm_with_thinking_off_answers_after_the_closed_block(autoglm):
    engine, processor, state = autoglm
    prep = engine.family.prepare(processor, [Message("user", "hi")], enable_thinking=False)
    assert prep.thinking_open is False
    state["step"] = len(processor.tokenizer.encode("reasoning text", add_special_tokens=False)) + 1
    assert ask(engine, thinking=False) == ("", "answer")


def test_the_projects_own_template_does_not_open_thinking_in_the_prompt(small):
    _, processor = small
    prep = AUTOGLM.prepare(processor, [Message("user", "hi")], enable_thinking=True)
    assert prep.thinking_open is False
