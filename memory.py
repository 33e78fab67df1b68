"""
Memory at paper scale: the peak bytes of one training update of any method at any preset, on a CPU.

    python bench.py --memory --model_config llama_7b --methods full,relora,switchlora,golore,lte,loqt \
        --method_args "lte=--batch_size 4"               # LTE's 4 heads each need a sequence of the batch
    python bench.py --memory --model_config llama_60m,llama_130m,llama_350m,llama_1b,llama_7b --ranks paper
    python bench.py --memory --model_config llama_7b --methods loqt --method_args "loqt=--lora_r 1024 --optimizer adam8bit"
    python memory.py --check --model_config llama_130m     # the estimate against a real CPU run

How. Nothing here is a formula. train.py's own stages run unchanged: build() (the meta-device
skeleton, the method's wrap(), the optimizer), then train_step() for two updates, the second one
with the method's periodic event forced on (the method's EVENT_EVERY_UPDATE: ReLoRA's merge and
optimizer reset, SwitchLoRA's switch, GoLore's projection, LTE's merge, LoQT's refresh). They run
on fake tensors (torch._subclasses.fake_tensor.FakeTensorMode): every op computes shapes and dtypes
and allocates nothing, so llama_7b takes seconds. A TorchDispatchMode (MemoryMeter) sees every
tensor the ops create and follows its storage until it is freed, so it knows the live bytes after
every op, and keeps the largest total: the peak, with the phase it happened in and its breakdown:

    weights      parameters and buffers as stored (NF4 codes count as codes, 4.5 bits a weight)
    grads        .grad of parameters, and full-gradient buffers a method allocates in step_start
    optimizer    optimizer state tensors (8-bit codes count as codes)
    activations  tensors created in the forward (what autograd saves, and the forward's transients)
    temps        everything else: backward transients, the optimizer's and the events' workspaces

Bytes are counted as a CUDA GPU would hold them (torch.cuda.max_memory_allocated): each allocation
rounded up to 512 bytes, and torch's optimizers on their GPU default (foreach: one extra
state-sized buffer during the step). Autocast runs as CPU autocast, whose casts match CUDA's for
the ops this model uses. Tensors a method offloads (train.offload_device) land on the meta device
here and are reported apart as host bytes. Not modelled: the caching allocator's fragmentation
and reserved-but-free memory (nvidia-smi shows more), CUDA context and library workspaces
(cuBLAS, cuSOLVER for the SVD), and NCCL buffers.

Checked against reality (--check, and tests/test_memory.py): the same two updates run for real on
the CPU while torch.profiler records every allocation of the CPU allocator; the peak of that
timeline is compared with the estimate made with CPU semantics (no rounding, CPU optimizer
defaults, offloaded tensors on the CPU too).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import train
from model import count_params_formula, get_config

CATEGORIES = ("weights", "grads", "optimizer", "activations", "temps")
PHASE_CATEGORY = {"build": "weights", "step_start": "grads", "forward": "activations"}  # else: temps
# ranks of the papers' runs by model size (GaLore/LoQT tables; ReLoRA and SwitchLoRA used 128-256)
PAPER_RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_3b": 512,
               "llama_7b": 1024, "llama_13b": 1024}
RANK_CAP = {"relora": 512, "switchlora": 256, "golore": 512, "lte": 64, "loqt": 1024}
GIB = 2 ** 30


class MemoryMeter(TorchDispatchMode):
    """Live bytes of every tensor storage created under it, by device and category, and the peak."""

    def __init__(self, device="cpu", round_to=512):
        super().__init__()
        self.device, self.round_to = device, round_to
        self.live = {}  # storage handle -> [bytes, device type, category]
        self.now = {c: 0 for c in CATEGORIES}  # bytes on `device`, by category
        self.host = self.host_peak = 0  # bytes elsewhere (offloaded)
        self.phase, self.update = "build", 0
        self.peak, self.peak_at, self.peak_by = 0, None, dict(self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, PHASE_CATEGORY.get(self.phase, "temps"))
        return out

    def track(self, t, category):
        st = t.untyped_storage()
        if st._cdata in self.live:
            return
        n = st.nbytes()
        if t.device.type == self.device and self.round_to:
            n = -(-n // self.round_to) * self.round_to
        self.live[st._cdata] = [n, t.device.type, category]
        weakref.finalize(st, self.free, st._cdata)
        if t.device.type == self.device:
            self.now[category] += n
            if sum(self.now.values()) > self.peak:
                self.peak, self.peak_at, self.peak_by = sum(self.now.values()), (self.update, self.phase), dict(self.now)
        else:
            self.host += n
            self.host_peak = max(self.host_peak, self.host)

    def free(self, key):
        n, dev, category = self.live.pop(key)
        if dev == self.device:
            self.now[category] -= n
        else:
            self.host -= n

    def claim(self, t, category):
        """Re-label the storage of tensor t (it turned out to be a weight, a gradient, optimizer state)."""
        entry = self.live.get(t.untyped_storage()._cdata) if t is not None else None
        if entry and entry[2] != category:
            if entry[1] == self.device:
                self.now[entry[2]] -= entry[0]
                self.now[category] += entry[0]
            entry[2] = category

    def mark(self, phase, model=None, optimizer=None):
        """Enter `phase`; first re-label what the model and optimizer hold now."""
        for t in ([*model.parameters(), *model.buffers()] if model is not None else []):
            self.claim(t, "weights")
            self.claim(getattr(t, "grad", None), "grads")
        for st in (optimizer.state.values() if optimizer is not None else []):
            for v in st.values():
                if torch.is_tensor(v):
                    self.claim(v, "optimizer")
        self.phase = phase


class FakeBatches:
    """Stands in for data.TokenData: random token ids of the right shape (fake, under FakeTensorMode)."""

    def __init__(self, vocab_size, max_length):
        self.vocab_size, self.T = vocab_size, max_length

    def batch(self, step, batch_size, total_batch_size, micro=0, rank=0, world=1):
        xy = torch.randint(0, self.vocab_size, (batch_size, self.T + 1))
        return xy[:, :-1], xy[:, 1:]


def configure(argv):
    """train.py's own command line, then the method's event forced on -> (TrainConfig, module, Config)."""
    tc, method, mc = train.parse_args(argv)
    event = getattr(method, "EVENT_EVERY_UPDATE", {})  # Config values, and train.py's where the event needs them
    train_keys = {f.name for f in dataclasses.fields(tc)}
    tc = dataclasses.replace(tc, **{k: v for k, v in event.items() if k in train_keys})
    mc = dataclasses.replace(mc, **{k: v for k, v in event.items() if k not in train_keys})
    train.check_geometry(tc)
    if tc.dtype == "auto":
        tc.dtype = "bfloat16"  # what a current GPU runs
    return tc, method, mc


def two_updates(tc, method, mc, vocab_size, device_kind, meter=None):
    """build() and two train_step()s, on whatever tensors are current (fake or real). -> Run."""
    amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[tc.dtype]
    autocast = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    run = train.Run(tc, method, mc, torch.device("cpu"), autocast, log=lambda *a, **k: None)
    run.data = FakeBatches(vocab_size, tc.max_length)
    train.build(run, vocab_size)
    if device_kind == "cuda":  # torch's optimizers take their foreach path on a GPU
        for g in run.optimizer.param_groups:
            if "foreach" in g:
                g["foreach"] = True
    mark = meter.mark if meter else (lambda *a, **k: None)
    for p in run.model.parameters() if meter else []:  # a gradient is a gradient as soon as it is accumulated
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: meter.claim(p.grad, "grads"))
    if meter:
        meter.host_peak = meter.host  # from here on: what a method offloads (the meta skeleton is gone)
    for step in (0, 1):
        if meter:
            meter.update = step + 1
        torch.manual_seed(step)
        train.train_step(run, step, mark=lambda phase: mark(phase, run.model, run.optimizer))
        mark("between updates", run.model, run.optimizer)
    return run


def estimate(argv, vocab_size=32000, device_kind="cuda"):
    """Peak bytes of the method's most expensive update, on fake tensors. -> dict (memory.json's entry)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    tc, method, mc = configure(argv)
    tc.offload_device = "meta" if device_kind == "cuda" else "cpu"  # offloaded bytes counted apart
    t0 = time.time()
    meter = MemoryMeter("cpu", round_to=512 if device_kind == "cuda" else 0)
    with FakeTensorMode(), meter:
        run = two_updates(tc, method, mc, vocab_size, device_kind, meter)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    by = meter.peak_by
    return {"peak_bytes": meter.peak, "weights_bytes": by["weights"], "grad_bytes": by["grads"],
            "optimizer_bytes": by["optimizer"], "activation_bytes": by["activations"], "temp_bytes": by["temps"],
            "peak_phase": meter.peak_at[1], "peak_update": meter.peak_at[0], "host_bytes": meter.host_peak,
            "total_params": count_params_formula(get_config(tc.model_config, vocab_size)),
            "trainable_params": trainable, "seconds": round(time.time() - t0, 1),
            "command": "python train.py " + " ".join(shlex.quote(a) for a in argv)}


def measure(argv, vocab_size=32000):
    """The same two updates for real on the CPU; the peak of the CPU allocator's timeline (torch.profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    tc, method, mc = configure(argv)
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run = two_updates(tc, method, mc, vocab_size, "cpu")
    del run
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, n in sorted(events):  # allocations positive, frees negative
        live += n
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- the fit finder (--fit)

FIT_MODES = {"plain": [], "activation_checkpointing": ["--activation_checkpointing"],
             "per_layer_updates": ["--per_layer_updates", "--grad_clipping", "0"]}


def fit_modes():
    """The modes this train.py has: --activation_checkpointing only where TrainConfig has the field."""
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    return {k: v for k, v in FIT_MODES.items() if k == "plain" or k in fields}


def batch_error(e):
    """A user error about the batch geometry (LTE: a batch its heads divide): that size is invalid, not the method."""
    return isinstance(e, train.USER_ERRORS) and "batch" in str(e).lower()


def fit_batch(argv, budget, vocab_size=32000, max_batch=1024, probe=16, log=None):
    """The largest --batch_size whose estimated peak is <= budget bytes: exponential doubling, then bisection
    (the peak grows with the batch), over the valid sizes only: multiples of the smallest size the method
    accepts (LTE: its --num_heads; found by trying 1, 2, ... up to `probe`). Raises the user error of a
    configuration no batch size fixes (e.g. --per_layer_updates on a method without it).
    -> dict: batch_size (0: not even the smallest valid size fits), peak_bytes (at batch_size; None at 0),
    step, next_batch_size / next_peak_bytes (the next valid size, over the budget; None when capped or
    never estimated), capped, min_peak_bytes (the smallest valid size's peak), estimates (estimator calls),
    the estimate at batch_size (breakdown, command), seconds."""
    t0, cache = time.time(), {}

    def est(b):
        if b not in cache:
            cache[b] = estimate(argv + ["--batch_size", str(b)], vocab_size)
            if log:
                log(f"    batch {b:>5}: peak {cache[b]['peak_bytes'] / GIB:8.2f} GiB ({cache[b]['seconds']:.0f}s)")
        return cache[b]

    step, first = None, None
    for b in range(1, min(probe, max_batch) + 1):
        try:
            est(b)
            step = b
            break
        except train.USER_ERRORS as e:
            if not batch_error(e):
                raise
            first = first or e
    if step is None:
        raise first if first else train.TrainingError(f"no batch size up to {max_batch} is valid")
    fits = lambda k: est(k * step)["peak_bytes"] <= budget  # noqa: E731
    lo, hi, capped = 0, None, False  # in units of step: lo fits, hi does not
    if fits(1):
        lo, kmax = 1, max_batch // step
        while hi is None:
            if lo >= kmax:
                capped = True
                break
            k = min(2 * lo, kmax)
            if fits(k):
                lo = k
            else:
                hi = k
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    else:
        hi = 1
    b = lo * step
    out = dict(cache[b]) if b else {}
    out.update(batch_size=b, peak_bytes=cache[b]["peak_bytes"] if b else None, step=step,
               next_batch_size=(lo + 1) * step if not capped else None,
               next_peak_bytes=cache[(lo + 1) * step]["peak_bytes"] if (lo + 1) * step in cache and not capped else None,
               capped=capped, min_peak_bytes=cache[step]["peak_bytes"], estimates=len(cache),
               seconds=round(time.time() - t0, 1))
    if not b:
        out["command"] = cache[step]["command"]
    return out


def fit_alternatives(method, argv, budget, batch, vocab_size=32000):
    """What would make `batch` fit: each remedy that applies to the method alone, at that batch, and all
    of them together when none fits alone. -> [{"flags", "peak_bytes", "fits"}] (a remedy the method rejects is left out)."""
    _, _, mc = configure(argv + ["--batch_size", str(batch)])
    has = lambda flag: flag in argv  # noqa: E731
    cands = []
    if method == "loqt" and not has("--use_offloading"):
        cands.append(["--use_offloading"])
    if not has("--per_layer_updates"):
        cands.append(FIT_MODES["per_layer_updates"])
    if method in ("golore", "loqt") and "adam8bit" not in argv:
        cands.append(["--optimizer", "adam8bit"])
    if getattr(mc, "lora_r", 0) > 1 and method != "full":
        cands.append(["--lora_r", str(mc.lora_r // 2)])
    if "bfloat16" not in argv:
        cands.append(["--storage_dtype", "bfloat16"])
    out, ok = [], []
    for flags in cands:
        try:
            r = estimate(argv + flags + ["--batch_size", str(batch)], vocab_size)
        except train.USER_ERRORS:  # e.g. --per_layer_updates on a method without it
            continue
        out.append({"flags": " ".join(flags), "peak_bytes": r["peak_bytes"], "fits": r["peak_bytes"] <= budget})
        ok.append(flags)
    if len(ok) > 1 and not any(a["fits"] for a in out):  # no single remedy: all of them together
        r = estimate(argv + sum(ok, []) + ["--batch_size", str(batch)], vocab_size)
        out.append({"flags": " ".join(sum(ok, [])), "peak_bytes": r["peak_bytes"], "fits": r["peak_bytes"] <= budget})
    return out


def gib(n):
    return f"{n / GIB:.1f}" if n >= 10 * GIB else f"{n / GIB:.2f}" if n >= GIB / 10 else f"{n / GIB:.3f}"


def fit_cell(r):
    if r is None:
        return "n/a"
    if r["batch_size"]:
        return f"{r['batch_size']}{'+' if r['capped'] else ''} ({gib(r['peak_bytes'])})"
    good = [a["flags"] for a in r.get("alternatives", []) if a["fits"]]
    return f"0 ({gib(r['min_peak_bytes'])} at {r['step']})" + (f"; fits with {' / '.join(good)}" if good else
                                                                    "; no single remedy fits")


def fit_main(args, common, extra, methods):
    """--fit GiB: the largest micro-batch of each method in each mode; a table, and fit.json under --out."""
    budget, modes, preset = int(args.fit * GIB), fit_modes(), args.model_config
    common = (["--max_length", "256"] if "--max_length" not in common else []) + list(common)
    res = {mode: {} for mode in modes}
    for m in methods:
        rank = (["--lora_r", str(min(PAPER_RANKS.get(preset, 128), RANK_CAP.get(m, 10 ** 9)))]
                if args.ranks == "paper" and m != "full" else [])
        for mode, flags in modes.items():
            argv_m = ["--method", m, "--model_config", preset] + common + rank + extra.get(m, []) + flags
            print(f"{m} [{mode}]", flush=True)
            try:
                r = fit_batch(argv_m, budget, args.vocab_size, args.fit_max_batch, log=print)
            except train.USER_ERRORS as e:
                print(f"    n/a: {e}", flush=True)
                res[mode][m] = {"batch_size": None, "error": str(e)}
                continue
            if not r["batch_size"] and not args.fit_no_alternatives:
                r["alternatives"] = fit_alternatives(m, argv_m, budget, r["step"], args.vocab_size)
            res[mode][m] = r
            print(f"    -> {fit_cell(r)}", flush=True)
    cmd = "python memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.cli else None
    head = "| method | " + " | ".join(f"{k}" for k in modes) + " |"
    rows = [head, "|---|" + "---|" * len(modes)]
    for m in methods:
        rows.append(f"| {m} | " + " | ".join(fit_cell(res[k][m] if res[k][m].get("batch_size") is not None else None)
                                            for k in modes) + " |")
    md = (f"Largest micro-batch within {args.fit:g} GiB (estimated peak GiB in brackets), {preset}, "
          f"common flags `{' '.join(common)}`{', ranks ' + args.ranks if args.ranks else ''}"
          + "".join(f", {k}: `{' '.join(v)}`" for k, v in extra.items()) + "\n\n" + "\n".join(rows) + "\n")
    os.makedirs(args.out, exist_ok=True)
    js = {"config": {"command": cmd, "budget_gib": args.fit, "budget_bytes": budget, "model_config": preset,
                     "common_args": common, "method_args": extra, "ranks": args.ranks,
                     "max_batch": args.fit_max_batch, "vocab_size": args.vocab_size, "mode_flags": modes},
          "methods": res["plain"], "modes": {k: {"methods": v} for k, v in res.items() if k != "plain"}}
    with open(os.path.join(args.out, "fit.json"), "w") as fh:
        json.dump(js, fh, indent=1)
    with open(os.path.join(args.out, "fit.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


# ----------------------------------------------------------------------------- reports


def table(results):
    head = ("| preset | method | trainable / total | weights | grads | optimizer | activations | temps "
            "| **peak GiB** | peak in | vs full |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for preset, methods in results.items():
        full = methods.get("full", {}).get("peak_bytes")
        for m, r in methods.items():
            g = lambda k: f"{r[k] / GIB:.2f}"  # noqa: E731
            ratio = f"{r['peak_bytes'] / full:.2f}x" if full else "-"
            host = f" (+{r['host_bytes'] / GIB:.1f} host)" if r.get("host_bytes") else ""
            rows.append(f"| {preset} | {m} | {r['trainable_params'] / 1e6:,.0f}M / {r['total_params'] / 1e6:,.0f}M "
                        f"| {g('weights_bytes')} | {g('grad_bytes')} | {g('optimizer_bytes')} | {g('activation_bytes')} "
                        f"| {g('temp_bytes')} | **{r['peak_bytes'] / GIB:.2f}**{host} | {r['peak_phase']} | {ratio} |")
    return "\n".join(rows)


def pivot(results):
    """Peak GiB, one row per method and one column per preset."""
    presets = list(results)
    methods = list(dict.fromkeys(m for p in presets for m in results[p]))
    rows = ["| method | " + " | ".join(presets) + " |", "|---|" + "---|" * len(presets)]
    for m in methods:
        rows.append(f"| {m} | " + " | ".join(f"{results[p][m]['peak_bytes'] / GIB:.2f}" if m in results[p] else "-"
                                            for p in presets) + " |")
    return "\n".join(rows)


def plot(results, path):
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    presets = list(results)
    sizes = [next(iter(results[p].values()))["total_params"] / 1e9 for p in presets]
    for m in dict.fromkeys(k for p in presets for k in results[p]):
        pts = [(s, results[p][m]["peak_bytes"] / GIB) for p, s in zip(presets, sizes) if m in results[p]]
        ax.plot(*zip(*pts), "o-", ms=4, label=m)
    for gib, label in ((24, "24 GiB"), (80, "80 GiB")):
        ax.axhline(gib, color="gray", ls="--", lw=1)
        ax.text(sizes[0], gib * 1.05, label, color="gray", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="peak GiB (estimated)",
           title="Peak memory of one training update")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,relora,switchlora,golore,lte,loqt")
    p.add_argument("--model_config", default="llama_60m", help="one preset, or several separated by commas")
    p.add_argument("--method_args", action="append", default=[], help='"method=--flag value ..." (repeatable)')
    p.add_argument("--ranks", default=None, help="'paper': each preset at the papers' rank (capped per method)")
    p.add_argument("--vocab_size", type=int, default=32000, help="the papers' T5 vocabulary (default 32000)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--check", action="store_true", help="also run the two updates for real on the CPU and compare")
    p.add_argument("--fit", type=float, default=None, metavar="GiB",
                   help="find each method's largest --batch_size whose estimated peak is within GiB (fit.json)")
    p.add_argument("--fit_max_batch", type=int, default=1024, help="--fit: search no further than this batch")
    p.add_argument("--fit_no_alternatives", action="store_true",
                   help="--fit: when nothing fits, do not try the remedies at the smallest batch")
    args, common = p.parse_known_args(argv)
    args.cli = argv is None
    raw_common = common
    common = ["--batch_size", "1", "--max_length", "256"] + common  # the micro-batch, unless given
    extra = {}
    for item in args.method_args:
        name, _, flags = item.partition("=")
        extra[name.strip()] = shlex.split(flags)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.fit is not None:
        if "," in args.model_config:
            p.error("--fit takes one --model_config")
        return fit_main(args, raw_common, extra, methods)
    results, checks, failed = {}, [], []
    for preset in args.model_config.split(","):
        results[preset] = {}
        for m in methods:
            rank = (["--lora_r", str(min(PAPER_RANKS.get(preset, 128), RANK_CAP.get(m, 10 ** 9)))]
                    if args.ranks == "paper" and m != "full" else [])
            argv_m = ["--method", m, "--model_config", preset] + common + rank + extra.get(m, [])
            try:
                r = estimate(argv_m, args.vocab_size)
            except train.USER_ERRORS as e:  # e.g. LTE's heads need a batch they divide: report, go on
                failed.append(f"{m} on {preset}: {e} (flags for one method: --method_args \"{m}=--flag value\")")
                print(f"error: {failed[-1]}", file=sys.stderr)
                continue
            results[preset][m] = r
            print(f"{preset:>11} {m:>10}: peak {r['peak_bytes'] / GIB:7.2f} GiB in {r['peak_phase']} "
                  f"(update {r['peak_update']}; estimated in {r['seconds']:.0f}s)", flush=True)
            if args.check:
                est = estimate(argv_m, args.vocab_size, device_kind="cpu")["peak_bytes"]
                real = measure(argv_m, args.vocab_size)
                checks.append((preset, m, est, real))
                print(f"{'':>11} {'':>10}  CPU check: estimate {est / 2**20:,.1f} MiB, measured {real / 2**20:,.1f} MiB "
                      f"({100 * (est - real) / real:+.1f}%)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    cmd = "python bench.py --memory " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    md = (f"Command: `{cmd}`  \nEstimated with fake tensors (memory.py); vocabulary {args.vocab_size}; "
          f"GiB = 2^30 bytes; the host column counts offloaded tensors.\n\n{table(results)}\n"
          + (f"\nPeak GiB by model size:\n\n{pivot(results)}\n" if len(results) > 1 else "")
          + "".join(f"\nNot estimated: {f}\n" for f in failed))
    if checks:
        md += "\n| preset | method | estimate MiB (CPU) | measured MiB (CPU allocator) | difference |\n|---|---|---|---|---|\n"
        md += "".join(f"| {p_} | {m} | {e / 2**20:,.1f} | {r / 2**20:,.1f} | {100 * (e - r) / r:+.1f}% |\n" for p_, m, e, r in checks)
    with open(os.path.join(args.out, "memory.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "memory.json"), "w") as fh:
        json.dump({"config": {"command": cmd, "vocab_size": args.vocab_size, "common_args": common,
                              "method_args": extra, "ranks": args.ranks},
                   "methods": results[preset], "presets": results}, fh, indent=1)  # methods: the last preset
    if len(results) > 1:
        plot(results, os.path.join(args.out, "memory.png"))
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
