"""Train AutoGLM-Phone-Tiny on freshly generated ShapesWorld samples.

    python -m training.train                    # ~50 min on a 2-core CPU, resumable
    python -m training.train --max-minutes 50   # fit the schedule into a time budget

Every step draws new scenes, questions and (for a quarter of the samples) spoken
questions from the training voices, so there is no fixed data set to overfit. The
step's data depends only on (seed, step), so a resumed run sees what it would have.
At the end the model is exported in fp16 with its tokenizer and processor to
``assets/autoglm-phone-tiny``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from pathlib import Path

import torch

from autoglm_app.config import DEMO_MODEL, ROOT
from autoglm_app.modeling import AutoGLMConfig, AutoGLMForConditionalGeneration, AutoGLMProcessor, build_tokenizer
from autoglm_app.modeling.processing_autoglm import CHAT_TEMPLATES
from .losses import AuxHeads, FocusSupervision, cell_labels, focus_spans, focus_targets, question_labels
from . import speech
from .data import collate, corpus, encode, make_sample
from .shapesworld import TASK_WEIGHTS, TASKS

log = logging.getLogger("autoglm.train")

TINY_CONFIG = dict(
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=512,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    capacity_factor=2.0,
    router_aux_loss_coef=0.02,
    vision_model="vit-tiny",
    image_size=128,
    patch_size=16,
    vision_depth=4,
    vision_embed_dim=128,
    vision_num_heads=4,
    num_mel_bins=80,
    audio_hidden_size=128,
    audio_layers=3,
    audio_heads=4,
    max_audio_seconds=30.0,
    adapter_rank=64,
    max_position_embeddings=8192,
)


def build(out: Path) -> tuple[AutoGLMForConditionalGeneration, AutoGLMProcessor]:
    tokenizer = build_tokenizer(corpus(), vocab_size=768)
    ids = tokenizer.convert_tokens_to_ids
    config = AutoGLMConfig(
        **TINY_CONFIG,
        vocab_size=len(tokenizer),
        image_token_id=ids("<|image|>"),
        audio_token_id=ids("<|audio|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.name_or_path = "AutoGLM-Phone-Tiny"
    processor = AutoGLMProcessor.from_config(config, tokenizer)
    processor.save_pretrained(str(out / "processor"))
    return AutoGLMForConditionalGeneration(config), processor


def lr_at(step: int, total: int, peak: float, warmup: int = 100, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine to 10% of peak. With a time budget, progress is the larger of
    steps done and time used, so the schedule completes when the budget does on a slow machine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model, opt, step: int, elapsed: float = 0.0, aux=None) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}
    if aux is not None:
        state["aux"] = aux.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)


def focus_rows(samples, encoded, image_token_id: int, grid: int) -> list[tuple[int, int, int, list[int]]]:
    """Focus-supervision rows for a batch: (sample, query position, first patch position, patches).
    The query is the position whose output picks the target token (one before it)."""
    rows = []
    for i, (s, e) in enumerate(zip(samples, encoded)):
        if not s.images:
            continue
        spans = focus_spans(s.target, s.qa, s.scene)
        if not spans:
            continue
        first = e["input_ids"].index(image_token_id)
        for j, patches in focus_targets(e["target_offsets"], spans, s.scene.size, grid):
            rows.append((i, e["prompt_len"] + j - 1, first, patches))
    return rows


class StepBatches(torch.utils.data.Dataset):
    """Step ``i``'s batch, drawn from ``Random(seed * 1_000_003 + i)``: the same in any
    process, so worker processes can make batches ahead of the trainer in step order."""

    def __init__(self, processor, args, weights, grid: int, image_token_id: int):
        self.processor, self.args, self.weights = processor, args, weights
        self.grid, self.image_token_id = grid, image_token_id
        self.voices = speech.VOICES_TRAIN_WIDE if args.voices == "wide" else speech.VOICES_TRAIN

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int):
        a = self.args
        draw = a.seed * 1_000_003 + step
        rng = random.Random(draw)
        samples = [make_sample(rng, spoken_p=a.spoken_p, thinking_p=a.thinking_p, task_weights=self.weights,
                               voices=self.voices, perturb_speech=a.perturb_speech,
                               eq_db=a.perturb_eq)
                   for _ in range(a.batch)]
        # masking draws from its own stream, so turning it on leaves the samples themselves unchanged
        mask_rng = random.Random(draw * 7 + 1) if a.mask_speech else None
        encoded = [encode(self.processor, s, mask_rng) for s in samples]
        batch = collate(encoded, self.processor.tokenizer.pad_token_id)
        cells = [cell_labels(s.scene) for s in samples if s.images]
        questions = [question_labels(s.qa) for s in samples if s.audios]
        rows = focus_rows(samples, encoded, self.image_token_id, self.grid) if a.focus > 0 else []
        return batch, cells, questions, rows


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def step_batches(processor, args, weights, start: int, grid: int, image_token_id: int):
    """Batches for steps ``start..args.steps-1`` in order, from ``args.workers`` processes if asked."""
    data = StepBatches(processor, args, weights, grid, image_token_id)
    steps = range(start, args.steps)
    if args.workers <= 0:
        return (data[i] for i in steps)
    return torch.utils.data.DataLoader(
        data, sampler=steps, batch_size=None, num_workers=args.workers, prefetch_factor=4,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_one_thread)


def load_initial(path: Path):
    """Weights, config and processor to start a new stage from: a training run's directory
    (``checkpoint.pt``, ``config.json``, ``processor/``) or an exported model directory."""
    if (path / "checkpoint.pt").exists():
        processor = AutoGLMProcessor.from_pretrained(str(path / "processor"))
        config = AutoGLMConfig.from_json_file(str(path / "config.json"))
        model = AutoGLMForConditionalGeneration(config)
        state = torch.load(path / "checkpoint.pt", map_location="cpu")
        model.load_state_dict(state["model"])
        return model, processor, state.get("aux")
    processor = AutoGLMProcessor.from_pretrained(str(path))
    model = AutoGLMForConditionalGeneration.from_pretrained(str(path)).float()
    model.config.dtype = "float32"
    return model, processor, None


def export(model, processor, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    half = AutoGLMForConditionalGeneration(model.config)
    half.load_state_dict(model.state_dict())
    half = half.half().eval()
    half.config.dtype = "float16"
    half.save_pretrained(str(target))
    processor.save_pretrained(str(target))
    log.info("exported fp16 checkpoint to %s", target)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "autoglm-phone-tiny")
    p.add_argument("--export", type=Path, default=DEMO_MODEL)
    p.add_argument("--max-minutes", type=float, default=None, help="time budget: the LR schedule follows time used and training stops when it is spent")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="export the run's latest checkpoint (--out) to --export without training, e.g. "
                        "to evaluate a run while it continues")
    p.add_argument("--aux", type=float, default=0.5,
                   help="weight of the auxiliary encoder losses (per-cell shape/colour from the image "
                        "features, question slots from the speech features); 0 turns them off")
    p.add_argument("--spoken-p", type=float, default=0.25, help="share of English questions given as speech")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this run's checkpoint weights, or from an exported model directory "
                        "such as assets/autoglm-phone-tiny (a new schedule and data stream; use with a "
                        "new --out and --seed to continue training in a further stage)")
    p.add_argument("--focus", type=float, default=0.0,
                   help="weight of the focus-supervision loss: while writing about one shape, the "
                        "image attention of --focus-layers should fall on that shape's patches")
    p.add_argument("--focus-layers", default="2,3", help="decoder layers the focus loss supervises")
    p.add_argument("--task-weights", default=None,
                   help="sampling weights of the tasks " + ",".join(TASKS) + " (default "
                        + ",".join(map(str, TASK_WEIGHTS)) + ")")
    p.add_argument("--template", choices=sorted(CHAT_TEMPLATES), default=None,
                   help="prompt order of a user turn's parts for a new run or stage: media-first (image, "
                        "then the question; the default for a new run) or question-first (the question, "
                        "then the image, so the patches can read it); kept when resuming")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw and encode the batches ahead of the trainer (0: in the training loop)")
    p.add_argument("--voices", choices=("train", "wide"), default="train",
                   help="training voices for spoken questions: the 8 base voices, or 18 with more espeak-ng variants")
    p.add_argument("--perturb-speech", action="store_true",
                   help="speaker augmentation of spoken questions: speed perturbation and spectral tilt")
    p.add_argument("--perturb-eq", type=float, default=0.0,
                   help="with --perturb-speech: a random equaliser of up to this many dB per band")
    p.add_argument("--mask-speech", action="store_true",
                   help="mask random mel bands and short time spans of each spoken question's features "
                        "(SpecAugment-style; training only)")
    p.add_argument("--thinking-p", type=float, default=0.6, help="share of samples with thinking on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 products on a GPU
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"

    if args.export_only:
        if not ckpt.exists():
            p.error(f"no checkpoint in {args.out}")
        model, processor, _ = load_initial(args.out)
        export(model, processor, args.export)
        return
    torch.manual_seed(args.seed)
    init_aux = None
    if args.init_from and not ckpt.exists():
        # a further stage: the earlier stage's tokenizer, config and weights, a fresh optimiser and schedule
        model, processor, init_aux = load_initial(args.init_from)
        if args.template:
            processor.tokenizer.chat_template = CHAT_TEMPLATES[args.template]
        processor.save_pretrained(str(args.out / "processor"))
        model.config.to_json_file(str(args.out / "config.json"))
        log.info("initialised from %s", args.init_from)
    elif (args.out / "processor").exists() and ckpt.exists():
        processor = AutoGLMProcessor.from_pretrained(str(args.out / "processor"))
        config_path = args.out / "config.json"
        model = AutoGLMForConditionalGeneration(AutoGLMConfig.from_json_file(str(config_path)))
    else:
        model, processor = build(args.out)
        if args.template:
            processor.tokenizer.chat_template = CHAT_TEMPLATES[args.template]
            processor.save_pretrained(str(args.out / "processor"))
        model.config.to_json_file(str(args.out / "config.json"))
    model.to(device).train()
    aux = AuxHeads(model.config.hidden_size, model.config.image_size // model.config.patch_size).to(device)
    if args.aux > 0:
        aux.attach(model)
        if init_aux is not None:
            aux.load_state_dict(init_aux)  # the earlier stage's heads, not fresh ones
    grid = model.config.image_size // model.config.patch_size
    focus_sup = None
    if args.focus > 0:
        focus_sup = FocusSupervision(model, [int(x) for x in args.focus_layers.split(",")]).attach()
    weights = tuple(float(x) for x in args.task_weights.split(",")) if args.task_weights else None
    if weights is not None and len(weights) != len(TASKS):
        p.error(f"--task-weights needs {len(TASKS)} numbers ({', '.join(TASKS)})")
    params = list(model.parameters()) + (list(aux.parameters()) if args.aux > 0 else [])
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        if "aux" in state:
            aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        start, spent = state["step"], state.get("elapsed", 0.0)
        log.info("resumed at step %d after %.1f min", start, spent / 60)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("AutoGLM-Phone-Tiny: %.2fM parameters, training on %s from step %d to %d",
             n_params / 1e6, device, start, args.steps)

    batches = iter(step_batches(processor, args, weights, start, grid, model.config.image_token_id))
    t0 = time.time() - spent
    tokens, wait = 0, 0.0
    budget = args.max_minutes * 60 if args.max_minutes else None
    for step in range(start, args.steps):
        elapsed = time.time() - t0
        lr = lr_at(step, args.steps, args.lr, time_progress=elapsed / budget if budget else 0.0)
        waited = time.time()
        batch, cells, questions, rows = next(batches)
        wait += time.time() - waited
        tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(**batch, use_cache=False)
        loss, parts = out.loss, {}
        if args.aux > 0:
            aux_loss, parts = aux.loss(torch.tensor(cells, device=device) if cells else None,
                                       torch.tensor(questions, device=device) if questions else None)
            loss = loss + args.aux * aux_loss
        if focus_sup is not None:
            focus_loss = focus_sup.loss(rows)
            if focus_loss is not None:
                parts["focus"] = focus_loss
                loss = loss + args.focus * focus_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            extra = "  ".join(f"{k} {float(v.detach()):.3f}" for k, v in parts.items())
            run_s = max(time.time() - t0 - spent, 1e-9)
            log.info("step %5d  loss %.4f  balance %.3f  %s  lr %.2e  %.0f tok/s  data wait %.0f%%  %.1f min",
                     step, out.loss.item(), out.aux_loss.item(), extra, lr,
                     tokens / run_s, 100 * wait / run_s, (time.time() - t0) / 60)
        if (step + 1) % args.save_every == 0:
            save_checkpoint(ckpt, model, opt, step + 1, time.time() - t0, aux)
        if budget and time.time() - t0 > budget:
            save_checkpoint(ckpt, model, opt, step + 1, time.time() - t0, aux)
            log.info("time budget used at step %d; the schedule has finished", step + 1)
            break
    else:
        save_checkpoint(ckpt, model, opt, args.steps, time.time() - t0, aux)
    if not args.no_export:
        export(model.cpu(), processor, args.export)


if __name__ == "__main__":
    main()
