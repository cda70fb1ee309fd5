"""``python -m tools.bench gpu``: the ready GPU check of issue 18 (one command, table + JSON).

On one device (``--device cuda:0`` by default), in this order, each case within ``--budget-s`` (default 480 s,
model builds included; a case whose estimate would overrun it is skipped with a row saying so):

1. the copy bound: a device-to-device copy of a ``--copy-gib`` buffer (2 GiB), bytes read + written over the
   time, in GB/s (10^9 bytes/s);
2. ``random:autoglm-phone-9b`` and 3. ``random:glm-4.1v-9b-thinking`` in int4 (NF4, seeded random weights,
   ``loading.random_build``), each: the build time; the memory on the device after the build
   (``torch.cuda.memory_allocated``, and the build's ``max_memory_allocated``) against the plan's bytes for that
   device (``loading.planning``: exact NF4 accounting) and the tensor bytes counted on it; the engine's start
   (KV cache, compile warm-up where ``--compile`` makes one); the time to first token of one short image turn
   (thinking on, focus + routing on); the engine's decode rate (tokens after the first over their time,
   ``Stats.tokens_per_second``) with focus + routing on and off, ``--tokens`` tokens with end-of-text suppressed
   (``min_new_tokens``, as ``tools.bench engine``); ``model.generate`` on the same model and prompt (the
   family's ``prepare``), its decode rate (tokens - 1 over the time past a one-token run); ``--batch``
   concurrent requests through ``Engine.submit`` (aggregate tokens / wall time, prefills included); the routing
   shape (MoE layers x experts of the last ``Routing`` event's counts); and the share of the bandwidth bound;
4. the cross-device path: ``random:autoglm-phone-9b`` with a 2-way plan whose second device is the CPU
   (``gpus=[0, "cpu"]``), answering one short text turn (plan and bytes per device, the answer's length, rates);
   where the full 40 layers would overrun the budget, the same width with its first ``CROSS_LAYERS`` (8) layers,
   the row says so;
5. ``random:qwen3-vl-30b-a3b-instruct`` in int4 if the plan fits the device's free memory (else a skip row),
   measured as 2-3, so the routing shape reads 48 x 128.

The bound. Decoding one token at batch 1 reads every weight the decode step uses once, so
``bound tok/s = copy GB/s / bytes read per token``. Counted as read per token: the parameters and their
bitsandbytes quantization states (packed NF4 bytes, absmax, the nested absmax and code tables) of the decoder
layers, the final norm and the output head on that device; an MoE layer's routed experts at top_k / experts of
their bytes (only the chosen experts are read; routers and shared experts in full). Not counted: the token
embeddings (one row per token), the vision / audio encoders and the adapter (prefill only), buffers (rotary
tables), the KV cache and activations (small at these context lengths). ``share`` = the measured decode rate
(probes off) / that bound.

``--small``: the same flow on shrunk copies of the same configs (``tests/loading/shrunk.py``: the real
architecture and vocabulary, tiny widths and depths), a few tokens, so ``--small --device cpu`` runs on a
CPU in about a minute: what the tests and a machine without a GPU check.
On the device machine, ``tools/gpu_check.sh`` installs what travels (docs/PERFORMANCE.md, "GPU check").
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("autoglm.bench.gpu")

GB = 1e9
GiB = 1024**3

# name, kind, what the case is; in the order they run: the must-haves first
CASES = (
    ("autoglm-phone-9b", "model"),
    ("glm-4.1v-9b-thinking", "model"),
    ("autoglm-phone-9b", "cross"),
    ("qwen3-vl-30b-a3b-instruct", "model"),
)
# seconds a case takes beyond its build, and the build's seconds per GiB of plan, before anything was measured
# (a guess from the H200's copy and CPU speeds; replaced by what the run measures as it goes)
MEASURE_S = {"model": 45.0, "cross": 60.0}
BUILD_S_PER_GIB = 8.0
CROSS_CPU_FACTOR = 4.0  # the CPU half of a cross-device build packs NF4 on the CPU: slower per GiB
CROSS_LAYERS = 8  # the cross-device case's depth when the full 40 layers would overrun the budget


# ----------------------------------------------------------------------------- pure parts


def bound_tokens_per_s(copy_gb_per_s: float | None, read_bytes_per_token: int | None) -> float | None:
    """Tokens per second at which decoding would be limited by memory bandwidth alone."""
    if not copy_gb_per_s or not read_bytes_per_token:
        return None
    return copy_gb_per_s * GB / read_bytes_per_token


def share_of_bound(tokens_per_s: float | None, bound: float | None) -> float | None:
    if tokens_per_s is None or not bound:
        return None
    return tokens_per_s / bound


def estimate_case_s(kind: str, plan_gib: float, build_s_per_gib: float = BUILD_S_PER_GIB,
                    cpu_gib: float = 0.0) -> float:
    """The seconds a case is expected to take: its build at ``build_s_per_gib`` (the part of a GPU run's plan on
    the CPU ``CROSS_CPU_FACTOR`` times slower) plus its measurements."""
    return ((plan_gib - cpu_gib) + cpu_gib * CROSS_CPU_FACTOR) * build_s_per_gib + MEASURE_S[kind]


def skip_reason(elapsed_s: float, budget_s: float, estimate_s: float) -> str | None:
    """Why a case is skipped (its estimate would overrun the budget), or None to run it."""
    if elapsed_s + estimate_s > budget_s:
        return (f"over budget: {elapsed_s:.0f} s spent + about {estimate_s:.0f} s for this case > "
                f"--budget-s {budget_s:.0f}")
    return None


def _fmt(value, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f}"


def gpu_table(r: dict) -> str:
    """The check's result as markdown: one row per model, the cross-device turn, the skips and failures."""
    bw = r.get("bandwidth") or {}
    lines = [
        f"GPU check on {r['device']} ({r['label']}): torch {r['versions'].get('torch')}, bitsandbytes "
        f"{r['versions'].get('bitsandbytes')}, transformers {r['versions'].get('transformers')}; "
        f"{r['tokens']} tokens a run, median of {r['repeats']}, compile {r['compile']}; "
        f"{r['elapsed_s']:.0f} s of --budget-s {r['budget_s']:.0f}",
        f"copy bound: {_fmt(bw.get('gb_per_s'))} GB/s (a copy of {_gib(bw.get('buffer_bytes'))} GiB on the device, "
        f"read + write, {bw.get('iters')} copies)",
        "",
        "| model (int4) | build s | weights GiB: allocated / plan / counted | build peak GiB | TTFT ms (image) "
        "| engine off tok/s | engine on tok/s | generate tok/s | batch agg tok/s | read GiB/token | bound tok/s "
        "| share (off) | routing | step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    for row in r["rows"]:
        name = row["case"]
        if row["status"] != "ok":
            extra.append(f"- {name} ({row['kind']}): **{row['status']}**: {row.get('reason', '')}")
            continue
        if row["kind"] == "cross":
            per = ", ".join(f"{d} {_gib(b)} GiB (layers {row['layers'].get(d, '-')})"
                            for d, b in row["plan_bytes"].items())
            extra.append(
                f"- cross-device {name}: plan {per}; build {_fmt(row['build_s'])} s; one text turn answered "
                f"({row['completion_tokens']} tokens, {len(row['answer'])} chars, finish {row['finish_reason']}), "
                f"TTFT {_fmt(row['ttft_ms'])} ms, decode {_fmt(row['decode_tps'])} tok/s; step {row['step']}"
                + (f"; allocated on the GPU {_gib(row['allocated_bytes'])} GiB" if row.get("allocated_bytes") else "")
                + (f" ({row['note']})" if row.get("note") else ""))
            continue
        mem = f"{_gib(row['allocated_bytes'])} / {_gib(row['plan_bytes'])} / {_gib(row['counted_bytes'])}"
        share = row.get("share_off")
        lines.append(
            f"| {name} | {_fmt(row['build_s'])} | {mem} | {_gib(row['build_peak_bytes'])} | {_fmt(row['ttft_ms'])} "
            f"| {_fmt(row['engine_off_tps'])} | {_fmt(row['engine_on_tps'])} | {_fmt(row['generate_tps'])} "
            f"| {_fmt(row['batch_tps'])} ({row['batch']}) | {_gib(row['read_bytes_per_token'])} "
            f"| {_fmt(row['bound_tps'], 0)} | {'n/a' if share is None else f'{share:.1%}'} "
            f"| {row['routing'] or '-'} | {row['step']} |")
    lines += ["", *extra] if extra else []
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measurements


def copy_bandwidth(device: str, nbytes: int, iters: int = 10) -> dict:
    """GB/s of ``dst.copy_(src)`` on ``device``, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    cuda = src.is_cuda
    for _ in range(3):
        dst.copy_(src)
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    free_memory()
    return {"gb_per_s": round(2 * nbytes * iters / seconds / GB, 1), "buffer_bytes": nbytes, "iters": iters,
            "seconds": round(seconds, 5)}


def _quant_state_bytes(param) -> int:
    qs = getattr(param, "quant_state", None)
    if qs is None:
        return 0
    total = 0
    for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)):
        total += t.numel() * t.element_size() if torch.is_tensor(t) else 0
    nested = getattr(qs, "state2", None)
    if nested is not None:
        for t in (getattr(nested, "absmax", None), getattr(nested, "code", None)):
            total += t.numel() * t.element_size() if torch.is_tensor(t) else 0
    return total


def _active_expert_fraction(model) -> float:
    cfg = getattr(model.config, "text_config", None) or model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    return top_k / experts if experts and top_k else 1.0


def device_bytes(model, device: str, layers_path: str) -> dict:
    """Tensor bytes on ``device``: all of them (parameters + quantization states + buffers, as the plan counts),
    and those one decode step reads (see the module's docstring: decoder layers, final norm and head, routed
    experts at top_k / experts)."""
    from autoglm_app.loading.planning import head_units, placement_unit

    want = torch.device(device)
    want_index = want.index if want.index is not None else (0 if want.type == "cuda" else None)

    def here(t: torch.Tensor) -> bool:
        return t.device.type == want.type and (want.type != "cuda" or t.device.index == want_index)

    head = set(head_units(layers_path))
    fraction = _active_expert_fraction(model)
    total = read = experts = 0
    seen: set[int] = set()
    counted_read: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not here(p):
            continue
        nbytes = p.numel() * p.element_size() + _quant_state_bytes(p)
        if id(p) not in seen:
            seen.add(id(p))
            total += nbytes
        unit = placement_unit(name, layers_path)
        if (unit.startswith(layers_path + ".") or unit in head) and id(p) not in counted_read:
            counted_read.add(id(p))  # a tied head counts once, under the head
            if ".experts." in name:
                experts += nbytes
                read += nbytes * fraction
            else:
                read += nbytes
    for _, b in model.named_buffers():
        if here(b):
            total += b.numel() * b.element_size()
    return {"counted_bytes": total, "read_bytes_per_token": int(read), "expert_bytes": experts,
            "active_expert_fraction": fraction}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def generate_decode_tps(engine, tokens: int) -> float:
    """``model.generate``'s decode rate on the engine's model and the benchmark prompt (the family's prepare):
    (tokens - 1) over the time past a one-token run, the engine's rule for its own rate."""
    from tools.bench import engine_request

    model, processor, family = engine.loaded.model, engine.loaded.processor, engine.family
    prep = family.prepare(processor, engine_request(tokens, False).messages, True)
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def seconds(n: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        _sync(str(device))
        assert out.shape[1] - inputs["input_ids"].shape[1] == n, (out.shape, n)
        return time.perf_counter() - t0

    seconds(2)  # warm-up
    full, first = seconds(tokens), seconds(1)
    return (tokens - 1) / max(full - first, 1e-9)


def batch_tps(engine, tokens: int, concurrent: int) -> dict:
    """``concurrent`` requests submitted together through ``Engine.submit``: aggregate tokens / wall seconds."""
    from autoglm_app.events import Stats
    from tools.bench import engine_request

    stats: list[Stats] = []
    lock = threading.Lock()

    def consume(handle) -> None:
        for e in handle.events():
            if isinstance(e, Stats):
                with lock:
                    stats.append(e)

    t0 = time.perf_counter()
    handles = [engine.submit(engine_request(tokens, False)) for _ in range(concurrent)]
    threads = [threading.Thread(target=consume, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sum(s.completion_tokens for s in stats)
    return {"batch": concurrent, "batch_tps": round(done / wall, 1), "batch_wall_s": round(wall, 2),
            "batch_tokens": done, "batch_completed": len(stats)}


def _turn(engine, tokens: int, probes: bool, image: bool = True) -> tuple:
    """One request (the benchmark prompt): its Stats, answer text and last Routing event."""
    from autoglm_app.events import Answer, Error, Reasoning, Routing, Stats
    from tools.bench import engine_request

    events = engine.run(engine_request(tokens, probes, image))
    errors = [e for e in events if isinstance(e, Error)]
    if errors:
        raise RuntimeError(f"the engine answered an error: {errors[0].message}")
    stats = next(e for e in events if isinstance(e, Stats))
    text = "".join(e.text for e in events if isinstance(e, (Answer, Reasoning)))
    routing = [e for e in events if isinstance(e, Routing)]
    return stats, text, routing[-1] if routing else None


def routing_shape(event) -> str | None:
    """'layers x experts, top-k' of a Routing event's running counts."""
    if event is None:
        return None
    c = event.counts
    if isinstance(c, dict) or not hasattr(c, "prefill"):
        return None
    layers, experts = c.prefill.shape
    return f"{layers} x {experts}, top-{c.top_k}"


# ----------------------------------------------------------------------------- the cases


@dataclass
class Run:
    device: str
    small: bool
    tokens: int
    repeats: int
    batch: int
    budget_s: float
    compile: str
    copy_bytes: int
    start: float = field(default_factory=time.perf_counter)
    build_s_per_gib: float = BUILD_S_PER_GIB
    configs: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def gpus(self, kind: str) -> list:
        """The devices of a case's plan: this device, and for the cross-device case the CPU after it."""
        first = (torch.device(self.device).index or 0) if self.cuda else "cpu"
        return [first, "cpu"] if kind == "cross" else [first]


def config_path(run: Run, name: str, workdir: Path) -> Path:
    """The shipped config, or with ``--small`` its shrunk copy (written once into ``workdir``)."""
    if name not in run.configs:
        if run.small:
            from tests.loading.shrunk import write_shrunk

            run.configs[name] = write_shrunk(name, workdir)
        else:
            from autoglm_app.loading.random_build import CONFIGS

            run.configs[name] = CONFIGS / f"{name}.json"
    return run.configs[name]


def fewer_layers(path: Path, layers: int, workdir: Path) -> Path:
    """A copy of the config at ``path`` with only its first ``layers`` decoder layers (full width)."""
    data = json.loads(Path(path).read_text())
    text = data.get("text_config", data)
    text["num_hidden_layers"] = layers
    if "moe_layers" in text:
        text["moe_layers"] = [i for i in text["moe_layers"] if i < layers]
    out = workdir / f"{Path(path).stem}-{layers}l.json"
    out.write_text(json.dumps(data, indent=1))
    return out


def device_budget(device) -> int:
    """What the loader gives each device by default (90% of what is free now): the plan is checked against it."""
    from autoglm_app.loading.checkpoints import _device_budget

    return _device_budget(device, None)


def plan_for(run: Run, path: Path, kind: str):
    """The device plan of ``path`` in int4 on this case's devices within what they have free (PlanError if not)."""
    from autoglm_app.loading.planning import load_config, normalize_device, plan_device_map

    devices = [normalize_device(d) for d in run.gpus(kind)]
    budget = min(device_budget(d) for d in devices)
    return plan_device_map(load_config(path), devices, budget, "int4")


def build(run: Run, path: Path, kind: str):
    """(loaded model, build seconds, allocated bytes after it, its peak) on this case's devices."""
    from autoglm_app.loading.checkpoints import load_model

    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    t0 = time.perf_counter()
    loaded = load_model(f"random:{path}", quantize="int4", gpus=run.gpus(kind), seed=0)
    _sync(run.device)
    build_s = time.perf_counter() - t0
    allocated = torch.cuda.memory_allocated(run.device) if run.cuda else None
    peak = torch.cuda.max_memory_allocated(run.device) if run.cuda else None
    return loaded, build_s, allocated, peak


def start_engine(run: Run, loaded):
    from autoglm_app.config import Limits
    from autoglm_app.engine.worker import Engine

    t0 = time.perf_counter()
    engine = Engine(loaded, Limits(), max_batch=run.batch, compile=run.compile)
    return engine, time.perf_counter() - t0


def measure_model(run: Run, name: str, path: Path, plan) -> dict:
    from autoglm_app.loading.planning import device_label
    from tools.bench import time_engine

    loaded, build_s, allocated, peak = build(run, path, "model")
    engine = None
    try:
        label = device_label(run.gpus("model")[0])
        counted = device_bytes(loaded.model, run.device, plan.layers_path)
        engine, start_s = start_engine(run, loaded)
        after_start = torch.cuda.memory_allocated(run.device) if run.cuda else None
        _turn(engine, 4, True)  # warm-up: both paths' first calls
        _turn(engine, 4, False)
        stats, _, routing = _turn(engine, run.tokens, True)
        off, on, ttft = [], [stats.tokens_per_second], [stats.ttft_s]
        for i in range(run.repeats):  # interleaved, so drift hits both alike
            off.append(time_engine(engine, run.tokens, False)[1].tokens_per_second)
            if i:
                _, s = time_engine(engine, run.tokens, True)
                on.append(s.tokens_per_second)
                ttft.append(s.ttft_s)
        gen = generate_decode_tps(engine, run.tokens)
        batch = batch_tps(engine, run.tokens, run.batch)
        decoding = engine.decoding()
        med = statistics.median
        bound = bound_tokens_per_s(run.bandwidth.get("gb_per_s"), counted["read_bytes_per_token"])
        return {
            "case": name, "kind": "model", "status": "ok", "model_id": loaded.model_id, "family": engine.family.name,
            "device_label": label, "build_s": round(build_s, 1), "engine_start_s": round(start_s, 1),
            "plan_bytes": plan.bytes_per_device[label], "plan_table": plan.table(), "allocated_bytes": allocated,
            "build_peak_bytes": peak, "allocated_after_engine_start_bytes": after_start, **counted,
            "ttft_ms": round(1000 * med(ttft), 1), "engine_off_tps": round(med(off), 1),
            "engine_on_tps": round(med(on), 1), "probe_overhead": round(1 - med(on) / med(off), 3),
            "generate_tps": round(gen, 1), **batch,
            "bound_tps": None if bound is None else round(bound, 1),
            "share_off": share_of_bound(med(off), bound), "share_on": share_of_bound(med(on), bound),
            "routing": routing_shape(routing), "peak_memory": stats.peak_memory,
            "step": decoding["step"], "compiled": decoding["compiled"], "decoding": decoding,
            "raw": {"engine_off": off, "engine_on": on, "ttft_s": ttft},
        }
    finally:
        if engine is not None:
            engine.close()
        del loaded, engine
        free_memory()


def measure_cross(run: Run, name: str, path: Path, plan) -> dict:
    loaded, build_s, allocated, _ = build(run, path, "cross")
    engine = None
    try:
        engine, start_s = start_engine(run, loaded)
        tokens = min(run.tokens, 8)
        stats, text, _ = _turn(engine, tokens, True, image=False)
        if not text.strip() or stats.completion_tokens != tokens:
            raise RuntimeError(f"the turn made {stats.completion_tokens} tokens, text {text!r}")
        layers = {}
        for slot, label in enumerate(plan.slot_labels):
            on = plan.layers_on(slot)
            layers[label] = f"{on[0]}-{on[-1]}" if on else "-"
        decoding = engine.decoding()
        return {
            "case": name, "kind": "cross", "status": "ok", "devices": [str(d) for d in run.gpus("cross")],
            "plan_bytes": dict(plan.bytes_per_device), "layers": layers, "plan_table": plan.table(),
            "build_s": round(build_s, 1), "engine_start_s": round(start_s, 1), "allocated_bytes": allocated,
            "ttft_ms": round(1000 * stats.ttft_s, 1), "decode_tps": round(stats.tokens_per_second, 2),
            "completion_tokens": stats.completion_tokens, "finish_reason": stats.finish_reason,
            "answer": text[:200], "peak_memory": stats.peak_memory, "step": decoding["step"], "decoding": decoding,
        }
    finally:
        if engine is not None:
            engine.close()
        del loaded, engine
        free_memory()


def run_case(run: Run, name: str, kind: str, workdir: Path) -> dict:
    from autoglm_app.loading.planning import PlanError

    row = {"case": name, "kind": kind}
    path = config_path(run, name, workdir)
    try:
        plan = plan_for(run, path, kind)
    except PlanError as err:
        return {**row, "status": "skipped", "reason": f"does not fit the free memory: {str(err).splitlines()[0]}"}
    def estimate(plan) -> float:
        cpu = sum(b for label, b in plan.bytes_per_device.items() if label.startswith("cpu")) if run.cuda else 0
        return estimate_case_s(kind, plan.total_bytes / GiB, run.build_s_per_gib, cpu / GiB)

    plan_gib = plan.total_bytes / GiB
    reason = skip_reason(run.elapsed, run.budget_s, estimate(plan))
    if reason and kind == "cross" and not run.small:  # time is short: the same width, CROSS_LAYERS layers
        path = fewer_layers(path, CROSS_LAYERS, workdir)
        plan = plan_for(run, path, kind)
        plan_gib = plan.total_bytes / GiB
        first = reason
        reason = skip_reason(run.elapsed, run.budget_s, estimate(plan))
        row = {**row, "case": f"{name} ({CROSS_LAYERS} of its layers)", "note": f"full depth skipped: {first}"}
    if reason:
        return {**row, "status": "skipped", "reason": reason, "plan_bytes_total": plan.total_bytes}
    t0 = time.perf_counter()
    try:
        result = (measure_cross if kind == "cross" else measure_model)(run, row["case"], path, plan)
    except Exception as err:  # one case's failure is a row; the others still run
        log.exception("%s (%s) failed", name, kind)
        free_memory()
        return {**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]}
    if kind == "model" and plan_gib > 0.5:  # what this device builds at, for the next estimates
        run.build_s_per_gib = max(result["build_s"] / plan_gib, 1.0)
    result["case_s"] = round(time.perf_counter() - t0, 1)
    if run.cuda:  # what freeing the case left on the device (the next case's figures start from it)
        result["left_allocated_bytes"] = torch.cuda.memory_allocated(run.device)
    return {**row, **result}


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("bitsandbytes", "transformers", "accelerate", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # reported, not fatal: the build then fails with its own message
            out[mod] = f"missing ({type(err).__name__})"
    return out


def run_gpu_bench(device: str = "cuda:0", small: bool = False, budget_s: float = 480.0, tokens: int | None = None,
                  repeats: int | None = None, batch: int = 8, compile_mode: str = "auto",
                  copy_gib: float | None = None, cases=CASES) -> dict:
    from autoglm_app.server import set_cpu_threads

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is visible here (use --device cpu with --small)")
    threads = set_cpu_threads(0)  # what the server does
    tokens = tokens or (8 if small else 32)
    repeats = repeats or (1 if small else 3)
    copy_bytes = int((copy_gib if copy_gib is not None else (0.125 if small else 2.0)) * GiB)
    run = Run(device, small, tokens, repeats, batch, budget_s, compile_mode, copy_bytes)
    if run.cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        label = f"{torch.cuda.get_device_name(device)}, {total / GiB:.0f} GiB"
    else:
        label = f"CPU ({platform.processor() or platform.machine()}, {threads} threads)"
    run.bandwidth = copy_bandwidth(device, copy_bytes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name, kind in cases:
            rows.append(run_case(run, name, kind, Path(tmp)))
            log.warning("%s (%s): %s at %.0f s", name, kind, rows[-1]["status"], run.elapsed)
    return {"device": device, "label": label, "small": small, "versions": versions(), "tokens": tokens,
            "repeats": repeats, "batch": batch, "compile": compile_mode, "budget_s": budget_s,
            "elapsed_s": round(run.elapsed, 1), "bandwidth": run.bandwidth, "rows": rows,
            "counted_as_read": "decoder layers + final norm + lm_head on the device: parameters and bitsandbytes "
                               "quant states; routed experts x top_k/experts; no embeddings, encoders, buffers, "
                               "KV cache"}


def add_parser(sub) -> None:
    """The ``gpu`` subcommand of ``tools.bench``."""
    g = sub.add_parser("gpu", help="the GPU check (issue 18): 9B int4 models, memory vs plan, TTFT, decode vs the "
                                   "copy bound, cross-device, Qwen3-VL-30B-A3B")
    g.add_argument("--device", default="cuda:0", help="cuda:N, or cpu (with --small: the flow on a CPU)")
    g.add_argument("--small", action="store_true", help="shrunk configs (tests/loading/shrunk.py): minutes -> seconds")
    g.add_argument("--budget-s", type=float, default=480.0, help="skip the cases that would overrun this")
    g.add_argument("--tokens", type=int, default=None, help="tokens a timed run makes (default 32; --small 8)")
    g.add_argument("--repeats", type=int, default=None, help="timed runs per rate (default 3; --small 1)")
    g.add_argument("--batch", type=int, default=8, help="concurrent requests for the aggregate rate")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    g.add_argument("--copy-gib", type=float, default=None, help="copy-bound buffer (default 2; --small 0.125)")
    g.add_argument("--only", default=None, help="comma-separated case names to run (default: all four, in order)")
    g.add_argument("--out", type=Path, default=Path("bench-results") / "gpu.json")


def run_from_args(args) -> dict:
    cases = CASES
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        cases = tuple(c for c in CASES if c[0] in wanted or f"{c[0]}:{c[1]}" in wanted or c[1] in wanted)
    return run_gpu_bench(args.device, args.small, args.budget_s, args.tokens, args.repeats, args.batch,
                         args.compile, args.copy_gib, cases)


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
