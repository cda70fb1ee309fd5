"""Tokenizers and processors for ``random:`` builds, made here from the config alone (no downloads).

A random-weight model still needs a tokenizer whose vocabulary is the config's ``vocab_size`` and
whose special tokens sit at the ids the config names: the model finds images by
``input_ids == config.image_token_id``, and the engine stops on the tokenizer's end tokens. So:

- a byte-level BPE is trained on a small built-in corpus (any text stays encodable);
- each special token the config names (``image_token_id``, ``vision_start_token_id``, ``eos_token_id``,
  ...) is placed at that id; an ``eos_token_id`` list takes the family's stop tokens in order (GLM:
  ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``); ``pad`` / ``bos`` ids that another token
  already holds are served by that token;
- the trained tokens, then the family's other special tokens, then filler pseudo-words (" bako",
  " tilumi", ...) take the remaining ids in order, so every id below ``vocab_size`` decodes to text.

The processor is the family's own transformers class (or ``AutoGLMProcessor``) with the image
processor's patch / merge / temporal sizes read from the vision config and a chat template in the
checkpoint's conventions.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

__all__ = ["TokenSpec", "TOKEN_SPECS", "build_processor", "build_tokenizer"]

TRAINED_VOCAB = 1024  # at most this many trained BPE tokens; the rest of the vocabulary is filler
MIN_ORDINARY = 264  # the byte alphabet and a few merges
CORPUS = [
    "There are two shapes: a red circle at the top left and a blue square at the center.",
    "How many shapes are there? Is there a red circle? Where is the blue triangle?",
    "I think the answer is yes. The image shows a phone screen with three buttons.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
    "What do you see in this picture? Describe the image. Who are you? Tap the search bar.",
    "我是一个多模态模型。你是谁？这张图片里有什么？",
]

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type in ['image', 'image_url'] %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type in ['audio', 'input_audio'] %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Qwen2.5-Omni: media wrapped in bos / eos markers, no thinking switch (not a thinking model)
OMNI25_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type in ['image', 'image_url'] %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c.type in ['audio', 'input_audio'] %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# GLM-4.1V-Thinking: its template has no thinking switch (the family appends an empty think block)
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type in ['image', 'image_url'] %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TokenSpec:
    """A family's special tokens and the config ids they must hold.

    roles: (config attribute(s) separated by '|', token) pairs that must sit exactly at the config's id;
    eos: the tokens an ``eos_token_id`` (or list) names, in order; aliases: ``pad`` / ``bos`` roles that a
    token already placed may serve; named: tokenizer attributes some processors read (``image_token``).
    """

    specials: tuple[str, ...]
    roles: tuple[tuple[str, str], ...]
    eos: tuple[str, ...]
    pad: str
    template: str
    bos: str | None = None  # the tokenizer's bos token (only AutoGLM's tokenizer has one)
    aliases: tuple[tuple[str, str], ...] = ()
    named: dict = field(default_factory=dict)


_GLM = TokenSpec(
    specials=("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
              "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>"),
    roles=(("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
           ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
           ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>")),
    eos=("<|endoftext|>", "<|user|>", "<|observation|>"), pad="<|endoftext|>", template=GLM_TEMPLATE,
    aliases=(("pad_token_id", "<|endoftext|>"),),
)
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
_QWEN_ROLES = (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
               ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
               ("vision_token_id", "<|vision_pad|>"))
_QWEN = TokenSpec(specials=_QWEN_SPECIALS, roles=_QWEN_ROLES, eos=("<|im_end|>",), pad="<|endoftext|>",
                  template=QWEN_TEMPLATE, aliases=(("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|endoftext|>")))
_OMNI25 = TokenSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
              "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>", "<think>", "</think>"),
    roles=(("audio_token_id|audio_token_index", "<|AUDIO|>"), ("image_token_id|image_token_index", "<|IMAGE|>"),
           ("video_token_id|video_token_index", "<|VIDEO|>"), ("audio_start_token_id", "<|audio_bos|>"),
           ("audio_end_token_id", "<|audio_eos|>"), ("vision_start_token_id", "<|vision_bos|>"),
           ("vision_end_token_id", "<|vision_eos|>"), ("vision_token_id", "<|vision_pad|>")),
    eos=("<|im_end|>",), pad="<|endoftext|>", template=OMNI25_TEMPLATE,
    aliases=(("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|im_start|>")),
    named=dict(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
               vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
               audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>"),
)
_OMNI3 = TokenSpec(
    specials=(*_QWEN_SPECIALS, "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"),
    roles=(*_QWEN_ROLES, ("audio_token_id", "<|audio_pad|>"), ("audio_start_token_id", "<|audio_start|>"),
           ("audio_end_token_id", "<|audio_end|>")),
    eos=("<|im_end|>",), pad="<|endoftext|>", template=QWEN_TEMPLATE, aliases=_QWEN.aliases,
    named=dict(image_token="<|image_pad|>", audio_token="<|audio_pad|>", video_token="<|video_pad|>",
               vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
               audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>"),
)


def _autoglm_spec() -> TokenSpec:
    from autoglm_app.modeling.processing_autoglm import CHAT_TEMPLATE, SPECIAL_TOKENS, THINK_TOKENS

    # the 9B config copies GLM-4's ids: eos [<|endoftext|>, <|user|>, <|observation|>], pad = <|endoftext|>
    return TokenSpec(specials=(*SPECIAL_TOKENS, *THINK_TOKENS, "<|observation|>"),
                     roles=(("image_token_id", "<|image|>"), ("audio_token_id", "<|audio|>")),
                     eos=("<|endoftext|>", "<|user|>", "<|observation|>"), pad="<|pad|>", bos="<|bos|>",
                     template=CHAT_TEMPLATE, aliases=(("pad_token_id", "<|pad|>"), ("bos_token_id", "<|bos|>")))


TOKEN_SPECS = {"glm4v": _GLM, "glm4v_moe": _GLM, "qwen2_5_vl": _QWEN, "qwen3_vl": _QWEN, "qwen3_vl_moe": _QWEN,
               "qwen2_5_omni": _OMNI25, "qwen3_omni_moe": _OMNI3}


def token_spec(family_name: str) -> TokenSpec:
    return _autoglm_spec() if family_name == "autoglm" else TOKEN_SPECS[family_name]


# ----------------------------------------------------------------------------- the tokenizer


def _lookup(config, names: str):
    """The first non-None value of any of ``names`` ('a|b') on the config, then on its text config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, text):
        for name in names.split("|"):
            value = getattr(c, name, None)
            if value is not None:
                return value
    return None


def _place(config, spec: TokenSpec, vocab_size: int) -> dict[int, str]:
    """id -> special token, for every special token the config gives a valid id.

    A media token's id must lie in the vocabulary (the model looks for it); an end, pad or bos id outside
    it (transformers only warns about those) is left out, and its token takes a free id instead.
    """
    placed: dict[int, str] = {}

    def valid(ident) -> bool:
        return isinstance(ident, int) and 0 <= ident < vocab_size

    for names, token in spec.roles:
        ident = _lookup(config, names)
        if ident is None:
            continue
        if not valid(ident):
            raise ValueError(f"the config's {names.split('|')[0]} = {ident!r} is not an id in its vocabulary "
                             f"(vocab_size {vocab_size}); fix the config")
        if placed.get(ident, token) != token:
            raise ValueError(f"the config gives {token} and {placed[ident]} the same id {ident}; fix the config")
        placed[ident] = token
    eos = _lookup(config, "eos_token_id")
    pairs = list(zip(eos if isinstance(eos, (list, tuple)) else [eos], spec.eos))
    pairs += [(_lookup(config, names), token) for names, token in spec.aliases]
    for ident, token in pairs:
        if ident is None or ident in placed or token in placed.values():
            continue
        if valid(ident):
            placed[ident] = token
        else:
            log.warning("the config's id %r for %s is outside its vocabulary (%d): %s gets a free id", ident, token,
                        vocab_size, token)
    return placed


def _trained_bpe(size: int):
    """(vocab token -> id, merges) of a byte-level BPE trained on CORPUS with at most ``size`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return [t for t, _ in vocab], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _fillers(taken: set[str]):
    """Pseudo-words as byte-level tokens with a leading space (' bako', ' tilumi', ...), never a taken one."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for length in itertools.count(1):
        for parts in itertools.product(syllables, repeat=length):
            token = "Ġ" + "".join(parts)
            if token not in taken:
                yield token


def build_tokenizer(config, family_name: str):
    """A fast tokenizer of exactly the config's vocabulary size with the config's special-token ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = token_spec(family_name)
    vocab_size = int(_lookup(config, "vocab_size"))
    placed = _place(config, spec, vocab_size)
    unplaced = [t for t in spec.specials if t not in placed.values()]
    room = vocab_size - len(placed) - len(unplaced)
    if room < MIN_ORDINARY:
        raise ValueError(f"vocab_size {vocab_size} leaves {room} ids for ordinary tokens after the "
                         f"{len(placed) + len(unplaced)} special tokens; a byte-level tokenizer needs at least "
                         f"{MIN_ORDINARY} (its 256 bytes and a few merges): raise vocab_size in the config")
    trained, merges = _trained_bpe(min(TRAINED_VOCAB, room))
    free = (i for i in range(vocab_size) if i not in placed)
    id_of = {token: i for i, token in placed.items()}
    fillers = _fillers(set(trained))
    for token in itertools.chain(trained, unplaced):
        id_of[token] = next(free)
    for i in free:
        id_of[next(fillers)] = i
    tok = Tokenizer(models.BPE(vocab=id_of, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    token_at = {i: t for t, i in id_of.items()}

    def role(names: str, fallback: str) -> str:  # the token at the config's id, or the family's own
        ident = _lookup(config, names)
        ident = ident[0] if isinstance(ident, (list, tuple)) else ident
        return token_at[ident] if isinstance(ident, int) and ident in placed else fallback

    roles = dict(eos_token=role("eos_token_id", spec.eos[0]), pad_token=role("pad_token_id", spec.pad))
    if spec.bos:
        roles["bos_token"] = role("bos_token_id", spec.bos)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles, **spec.named)
    fast.chat_template = spec.template
    if len(fast) != vocab_size:  # a bug, not a user error
        raise RuntimeError(f"built a tokenizer of {len(fast)} tokens for vocab_size {vocab_size}")
    return fast


# ----------------------------------------------------------------------------- the processor


def _image_sizes(config) -> dict:
    vision = getattr(config, "vision_config", None)
    return dict(patch_size=getattr(vision, "patch_size", 14), merge_size=getattr(vision, "spatial_merge_size", 2),
                temporal_patch_size=getattr(vision, "temporal_patch_size", 2))


def build_processor(config, family_name: str, tokenizer):
    """The family's processor around ``tokenizer``, with the image sizes of the config's vision tower."""
    import transformers as tf

    if family_name == "autoglm":
        from autoglm_app.modeling import AutoGLMProcessor

        return AutoGLMProcessor.from_config(config, tokenizer)
    sizes = _image_sizes(config)
    template = token_spec(family_name).template
    if family_name in ("glm4v", "glm4v_moe"):
        return tf.Glm4vProcessor(image_processor=tf.Glm4vImageProcessor(**sizes), tokenizer=tokenizer,
                                 video_processor=tf.Glm4vVideoProcessor(), chat_template=template)
    image_processor = tf.Qwen2VLImageProcessor(**sizes)
    if family_name == "qwen2_5_vl":
        return tf.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      video_processor=tf.Qwen2VLVideoProcessor(), chat_template=template)
    if family_name in ("qwen3_vl", "qwen3_vl_moe"):
        return tf.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=tf.Qwen3VLVideoProcessor(), chat_template=template)
    mels = getattr(getattr(config, "audio_config", None), "num_mel_bins", 128)
    features = tf.WhisperFeatureExtractor(feature_size=mels)
    if family_name == "qwen2_5_omni":
        return tf.Qwen2_5OmniProcessor(image_processor=image_processor, video_processor=tf.Qwen2VLVideoProcessor(),
                                       feature_extractor=features, tokenizer=tokenizer, chat_template=template)
    if family_name == "qwen3_omni_moe":
        return tf.Qwen3OmniMoeProcessor(image_processor=image_processor, video_processor=tf.Qwen3VLVideoProcessor(),
                                        feature_extractor=features, tokenizer=tokenizer, chat_template=template)
    raise ValueError(f"no processor for family {family_name!r}")
