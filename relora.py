"""
ReLoRA: high-rank training through a sequence of low-rank updates.

    Vladislav Lialin, Namrata Shivagunde, Sherin Muckatira, Anna Rumshisky. "Stack More Layers
    Differently: High-Rank Training Through Low-Rank Updates", 2023, arXiv:2307.05695 (ICLR 2024
    as "ReLoRA: High-Rank Training Through Low-Rank Updates"). Official code: Guitaricet/relora.

The idea
--------
LoRA freezes W (m x n) and trains a rank-r correction, h = W x + s * B A x with A (r x n),
B (m x r) and s = lora_alpha / r, so the total update W_T - W_0 = s B A never exceeds rank r.
ReLoRA restarts LoRA every P updates: it merges the adapter into the frozen weight and starts a
fresh one,

    W <- W + s B A,     A <- Kaiming-uniform,     B <- 0,

so after K restarts W_T - W_0 = sum_k s B_k A_k can reach rank K * r while only the 2 x r x (m + n)
adapter numbers ever carry gradients and Adam state. Two more pieces make restarts work: the Adam
state of A and B is (mostly) wiped at each restart, so the new adapter does not follow the old
one's momentum, and the learning rate follows a "jagged cosine": it drops to 0 at every restart
and re-warms linearly over w_r steps back onto one global cosine envelope. Warm-starting from a
partly trained full-rank model (train.py --warmed_up_model) closes most of the remaining gap.

Modes
-----
- --storage_dtype float32 (default): W, A, B and the full-rank rest are float32; the forward runs
  under --dtype autocast. --storage_dtype bfloat16 is the original's pure-bf16 model: W, A, B,
  embeddings, norms and lm_head, and so their Adam moments, are all bf16. A and B stay bf16 on
  purpose: at the ranks used at scale they are not small (r = 512 on llama_1b: r (m + n) is 40% of
  the adapted weights), and float32 factors would lift the llama_1b peak from 7.9 to 12.4 GiB, level
  with full-rank in bf16 (12.5). Merges are still summed in float32 and rounded once (point 4).
- --per_layer_updates works unchanged: ReLoRA needs no hook before the optimizer step, so each
  parameter is stepped as soon as its gradient is complete and the events run after the backward,
  with the same result as ordinary updates (no clipping or accumulation in that mode).
- --relora 0 is plain LoRA (point 9); --warmed_up_model is the paper's warm start (point 7).

Implementation details
----------------------
1. Every nn.Linear whose name contains "attn", "attention" or "mlp" (q/k/v/o, gate/up/down)
   becomes a ReLoRALinear. Embeddings, RMSNorm gains and lm_head stay full-rank and trainable,
   as in the original, under train.py's default AdamW: --weight_decay reaches the tensors with two
   or more dimensions (A, B, embeddings, lm_head), not the RMSNorm gains; W is not in the optimizer.
2. A ~ Kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt n, 1/sqrt n), B = 0: the wrapped model computes
   exactly the function of the plain one at wrap time. LoRA dropout (p = 0.1) acts on the
   adapter's input only.
3. The events fire after the optimizer step of 0-based update t = k P (k >= 1); under the jagged
   cosine that step ran at LR 0 and t + 1 is the first re-warmup step. This is the original's
   `(update_step - scheduler_start_step) % relora == 1` with update_step counted after the
   increment. The merge follows --relora, the optimizer reset --cycle_length (= --relora unless
   given), both only when --relora > 0.
4. The merge adds s B A to a float32 copy of W (float64 for a float64 model) and writes it back in
   W's dtype, so a bf16 W is rounded once. A is drawn on the CPU from a torch.Generator seeded
   with (seed, t) and copied to W's device: every DDP rank, every device and a resumed run draw
   the same A. Parameters are never rebound: optimizer, DDP and compile keep pointing at them.
5. The optimizer reset touches only trainable parameters named "lora_*", and in their Adam state
   only the tensors shaped like the parameter (exp_avg, exp_avg_sq). Adam's `step` is NOT reset.
   Modes (exactly one, else a ValueError): --reset_optimizer_on_relora (zero), or
   --optimizer_random_pruning p (zero each entry with probability p, mask drawn on the CPU from the
   (seed, t) generator), or --optimizer_magnitude_pruning p (per tensor, keep the n - round(p n)
   entries of largest magnitude). No event reads a tensor into Python (the logged fraction is a
   0-dim tensor), so memory.py runs them on fake tensors.
6. --scheduler cosine_restarts, ReLoRA's default here (TRAIN_DEFAULTS; cosine, linear or constant
   give train.py's), with w0 = --warmup_steps, w_r = --restart_warmup_steps, P = --cycle_length,
   else --relora, T = --num_training_steps, rho = --min_lr_ratio and
   env(x) = rho + (1 - rho) (1 + cos(pi x)) / 2:
       t < w0:                 lambda = t / w0
       t >= P, t mod P < w_r:  lambda = (t mod P) / w_r * env((floor(t/P) P + w_r - w0) / (T - w0))
       otherwise:              lambda = env((t - w0) / (T - w0))
   T must be a multiple of P and w0 <= P (the original's checks), else a one-line ValueError that
   names run lengths and periods that work. Without a period (--relora 0, no --cycle_length) there
   is no restart and lambda is train.py's cosine.
7. Warm start: train.py --warmed_up_model loads a plain model.pt, which records the updates it
   trained (`steps`). The step counter, the schedule and the optimizer start from 0 and
   --num_training_steps counts the ReLoRA updates only, but update t trains on the batch of data
   step `steps` + t: the data continue after the warm-up's (across --autoresume too). The original
   also builds a fresh scheduler and skips the consumed batches, but keeps counting its update
   step from the warm-up's value.
8. export() returns the plain GPT state dict on the CPU, W + s B A for each adapted layer, built
   on the device and moved to the CPU one layer at a time: the device never holds more than one
   extra layer, never a merged copy of the model.
9. Plain LoRA is ReLoRA without restarts: --relora 0 (no merge, no reset; W is still kept frozen
   and W_T - W_0 = s B A has rank <= r). A --relora larger than the run gives the same result.

Deviations from the official code, and why
------------------------------------------
- The original's ReLoRaModel zeroes A as well as B at wrap (commit 526e4dd, "make lora'ed network
  exactly the same as the original"). With A = B = 0 both gradients vanish, so the adapters stay
  dead until the first restart. We keep A random; B = 0 already gives the identical function.
  --zero_lora_A_at_wrap reproduces the original for comparison.
- --reset_optimizer_on_relora zeroes the states exactly; the original prunes 99.9% at random
  instead (exact zeros broke ZeroRedundancyOptimizer's state dicts, which we do not use).
- Magnitude pruning keeps an exact count via topk; the original thresholds at torch.quantile,
  which refuses tensors above 2**24 elements and keeps fewer than requested when values tie.
- Merges are summed in float32; the original adds s B A in the model dtype (bf16), rounding it more than once.
- Weight decay skips 1-D tensors (train.py's default optimizer, nanoGPT's rule: decaying the norm
  gains pulls them to 0); the original's AdamW decays every trainable tensor (its default
  --weight_decay is 0; the 1B config uses 0.01).
- After a warm start --num_training_steps counts the ReLoRA phase only (the original counts the
  warm-up too), so events and schedule start aligned at 0 and --adjust_step is not needed.
- Restart randomness comes from a (seed, step) generator, not from lockstep global RNGs.
- Not implemented: --train_scaling (a learnable s = tanh(sigma) re-zeroed at every restart,
  which with B = 0 gets no gradient), 4-bit quantised W, --adjust_step, ZeroRedundancyOptimizer.

Some warnings
-------------
- Adam's step counter survives the reset, so bias correction is ~1 right after it: for a steady
  gradient the k-th step of a new adapter is (1 - beta1^k) / sqrt(1 - beta2^k) times the usual,
  3.2x at k = 1 and up to 6.6x near k = 12 (betas 0.9, 0.999). Hence the jagged cosine, the
  default: with train.py's plain `cosine` the resets happen at a high LR, and the paper's ablation
  (Table 6) diverged with restarts and resets but no jagged schedule.
- W stays a full-size frozen tensor: the memory saved is gradients and Adam state of W only.
- With dropout > 0 the adapter output is stochastic in train mode; merge invariance holds for
  eval mode (or dropout 0). In bf16 storage it holds to bf16 rounding: a merge moves the logits
  less than bf16 computation itself does (tests/test_relora.py).
- The paper's recipe needs a full-rank warm start; from scratch ReLoRA lands close to LoRA.
- On `tiny` (h = 128, r = 32) the adapter matmuls cost about what the skipped dW saves, and the
  extra small ops and dropout make a step slower than full-rank; ReLoRA saves memory (no gradient
  or Adam state for W), and speed only at scale, where r << h.

Logged at each event: method/relora_merges (merges so far) and method/optimizer_zeroed_frac (the
fraction of LoRA Adam entries that are zero after the reset; 1.0 for the exact reset).

Memory
------
Peak of one update with a merge and a reset (memory.py: fake tensors, one sequence of 256 tokens,
vocabulary 32000, GiB), full-rank vs ReLoRA in the same storage dtype:

    python memory.py --methods full,relora --model_config llama_1b --ranks paper \
        [--storage_dtype bfloat16] [--per_layer_updates --grad_clipping 0]
    python memory.py --methods full,relora --model_config llama_7b --method_args "relora=--lora_r 1024" ...

                              float32 storage            bfloat16 storage
                              full    ReLoRA             full    ReLoRA
    llama_1b, r 512           25.0    15.9 (0.64x)       12.5     7.9 (0.64x)
      per-layer updates       18.4    16.0 (0.87x)        8.3     6.8 (0.82x)
    llama_1b, r 128           25.0    11.2 (0.45x)       12.5     4.6 (0.37x)
    llama_7b, r 1024         125.5    76.7 (0.61x)       62.8    38.4 (0.61x)
      per-layer updates       90.1    76.3 (0.85x)       39.6    30.7 (0.77x)

The paper reports up to 5.5 GB saved per GPU at 1.3B (with its own batch); here full minus ReLoRA
at llama_1b in bf16 is 7.8 GiB at r = 128 and 4.6 GiB at r = 512. One sequence keeps the
activations small; a larger batch adds them to both (a little more to ReLoRA, whose adapter path
saves its own inputs). With float32 storage the ReLoRA peak sits in the backward, where autocast
holds bf16 copies of the frozen W for the input gradients.

Usage
-----
    python train.py --method relora                                      # ReLoRA from scratch, jagged cosine
    python train.py --method full --num_training_steps 100 --save_dir out/warm   # warm start ...
    python train.py --method relora --warmed_up_model out/warm/model.pt  # ... then ReLoRA on the next batches
    python train.py --method relora --relora 0                           # plain LoRA
    python train.py --method relora --storage_dtype bfloat16             # the original's pure bf16

Defaults: paper (250M README / 1B yaml) vs here (for the `tiny` preset, 500 updates)
    lora_r 128 -> 32, lora_alpha 32 -> 32 (s = 0.25 -> 1), lora_dropout 0.1 -> 0.1,
    relora 5000 / 1000 -> 100, cycle_length = relora, restart_warmup_steps 100 -> 10,
    scheduler cosine_restarts (the README's command) -> the same, by default,
    reset_optimizer_on_relora True (README; the 1B yaml: False + magnitude pruning 0.8).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import materialize


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    lora_r: int = _opt(32, "r: adapter rank (paper 128)", aliases=["--rank", "--lora_rank"])
    lora_alpha: float = _opt(32.0, "alpha: the adapter is scaled by s = alpha / r (paper 32)")
    lora_dropout: float = _opt(0.1, "dropout on the adapter input (paper 0.1)")
    relora: int = _opt(100, "P: merge-and-reinit every P updates; 0 = plain LoRA (paper 5000)")
    cycle_length: int = _opt(0, "optimizer reset and LR restart period (0: same as --relora)")
    restart_warmup_steps: int = _opt(10, "w_r: LR re-warmup after each restart (paper 100)")
    reset_optimizer_on_relora: bool = _opt(True, "zero the LoRA Adam states at each restart")
    optimizer_random_pruning: float = _opt(0.0, "p: instead zero each LoRA Adam entry with probability p")
    optimizer_magnitude_pruning: float = _opt(0.0, "p: instead keep the largest 1-p of each LoRA Adam state")
    zero_lora_A_at_wrap: bool = _opt(False, "the original's A = 0 at wrap (adapters dead until the first restart)")


TRAIN_DEFAULTS = {
    "scheduler": "cosine_restarts",  # the jagged cosine: restarts without it diverged (Table 6)
    "lr": 4e-3,  # best on tiny in the README's LR sweep (1e-3 ... 8e-3, 1,000 updates, 2 seeds)
}
EVENT_EVERY_UPDATE = {"relora": 1, "restart_warmup_steps": 1, "warmup_steps": 1}  # a merge and a reset every update


# ----------------------------------------------------------------------------- the layer


class ReLoRALinear(nn.Module):
    """y = W x + b + s * B A dropout(x), with W frozen, A (r x n) and B (m x r) trainable."""

    def __init__(self, linear: nn.Linear, r, lora_alpha, lora_dropout, generator):
        super().__init__()
        m, n = linear.weight.shape
        self.in_features, self.out_features, self.r = n, m, r
        self.scaling = lora_alpha / r  # s = alpha / r
        self.weight = linear.weight  # W (m, n): the same Parameter object, now frozen
        self.weight.requires_grad_(False)
        self.bias = linear.bias  # stays trainable, as in the original
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)  # bf16 storage: bf16 factors (Modes)
        self.lora_A = nn.Parameter(torch.empty(r, n, **kw))  # A (r, n)
        self.lora_B = nn.Parameter(torch.zeros(m, r, **kw))  # B (m, r)
        self.lora_dropout = nn.Dropout(lora_dropout)
        self.reset_lora_parameters(generator)

    @torch.no_grad()
    def reset_lora_parameters(self, generator):
        # A ~ U(-1/sqrt(n), 1/sqrt(n)) (PyTorch's Linear init), B = 0: the adapter adds exactly 0.
        # Drawn on the CPU, so every device gets the same A.
        A = torch.empty(self.lora_A.shape, dtype=torch.float32)
        self.lora_A.copy_(nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator))
        self.lora_B.zero_()

    def forward(self, x):  # x (..., n) -> (..., m)
        y = F.linear(x, self.weight, self.bias)
        return y + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self):
        """W + s B A, a new tensor in W's dtype, summed in at least float32: a bf16 W is rounded once."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        W = self.weight.to(dt, copy=True)  # (m, n)
        return W.addmm_(self.lora_B.to(dt), self.lora_A.to(dt), alpha=self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge_and_reinit(self, generator):
        # W <- W + s B A; then A <- Kaiming, B <- 0. The function is unchanged (B = 0 again), and a
        # second call right after is a no-op on W (it adds s * 0 * A), so merging twice is harmless.
        self.weight.copy_(self.merged_weight())
        self.reset_lora_parameters(generator)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, s={self.scaling:g}"


# ----------------------------------------------------------------------------- model surgery


def _generator(seed, step):
    """A CPU torch.Generator that every rank seeds identically for the event at update `step`."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + 7919 * (step + 1) + 17)
    return g


def _check(cfg):
    if cfg.lora_r < 1:
        raise ValueError(f"--lora_r must be at least 1, got {cfg.lora_r}")
    if cfg.relora < 0 or cfg.cycle_length < 0 or cfg.restart_warmup_steps < 0:
        raise ValueError("--relora, --cycle_length and --restart_warmup_steps must be >= 0")
    for name in ("optimizer_random_pruning", "optimizer_magnitude_pruning", "lora_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    modes = [cfg.reset_optimizer_on_relora, cfg.optimizer_random_pruning > 0, cfg.optimizer_magnitude_pruning > 0]
    if sum(modes) > 1 or (cfg.relora > 0 and sum(modes) == 0):
        raise ValueError("ReLoRA needs exactly one optimizer reset mode: --reset_optimizer_on_relora (the default), "
                         "or --reset_optimizer_on_relora false with --optimizer_random_pruning p or "
                         "--optimizer_magnitude_pruning p")


def wrap(model, cfg, train):
    """Replace every attention/MLP nn.Linear by a ReLoRALinear (in place, on the model's device)."""
    _check(cfg)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ("attn" in name or "attention" in name or "mlp" in name)]
    for name, linear in targets:
        if cfg.lora_r > min(linear.weight.shape):
            raise ValueError(f"--lora_r {cfg.lora_r} exceeds the smaller dimension of {name} "
                             f"{tuple(linear.weight.shape)}; use a rank of at most {min(linear.weight.shape)}")
    g = _generator(train.seed, -1)
    for name, _ in targets:  # named_modules order: identical on every rank
        linear = materialize(model, name)  # real weights for this layer only (the GPT may be a meta skeleton)
        layer = ReLoRALinear(linear, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, g)
        if cfg.zero_lora_A_at_wrap:
            layer.lora_A.data.zero_()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def export(model, cfg):
    """The plain GPT state dict on the CPU: W + s B A for every adapted layer, no lora_* keys.

    Each merged weight is built on the model's device and moved to the CPU at once, so the device
    never holds more than one extra layer. The training model is untouched."""
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, ReLoRALinear)}
    sd = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in adapted and leaf in ("lora_A", "lora_B"):
            continue
        sd[key] = (adapted[owner].merged_weight() if owner in adapted and leaf == "weight" else t.detach()).cpu()
    return sd


# ----------------------------------------------------------------------------- optimizer reset


def magnitude_keep_mask(t, ratio):
    """Boolean mask keeping exactly n - round(ratio * n) entries of t with the largest |t|.

    topk instead of torch.quantile: no 2**24-element limit, and an exact count even among ties."""
    n = t.numel()
    n_keep = n - round(ratio * n)
    keep = torch.zeros(n, dtype=torch.bool, device=t.device)
    if n_keep > 0:
        keep[t.detach().abs().flatten().topk(n_keep, sorted=False).indices] = True
    return keep.view_as(t)


@torch.no_grad()
def reset_optimizer_state(model, optimizer, cfg, generator):
    """Zero or prune the Adam moments of the LoRA parameters only; -> the fraction now zero (0-dim tensor).

    Leaves every other parameter's state, and Adam's `step` counters, untouched. Never reads a
    tensor into Python, so it also runs on fake tensors (memory.py)."""
    zeros, total = [], 0
    for name, p in model.named_parameters():
        if "lora_" not in name or not p.requires_grad or p not in optimizer.state:
            continue
        for key, st in optimizer.state[p].items():
            if not torch.is_tensor(st) or st.shape != p.shape:  # `step` is a scalar: keep it
                continue
            if cfg.reset_optimizer_on_relora:
                st.zero_()
            elif cfg.optimizer_random_pruning > 0:
                # keep where u > p, u ~ U(0, 1) drawn on the CPU from the shared generator: same mask on every rank
                u = torch.rand(st.shape, generator=generator).to(st.device)
                st.masked_fill_(u <= cfg.optimizer_random_pruning, 0.0)
            else:
                st.masked_fill_(~magnitude_keep_mask(st, cfg.optimizer_magnitude_pruning), 0.0)
            zeros.append((st == 0).sum())
            total += st.numel()
    return torch.stack(zeros).sum() / total if zeros else torch.zeros(())


# ----------------------------------------------------------------------------- the jagged cosine


def jagged_cosine(t, T, w0, wr, P, rho):
    """LR multiplier of --scheduler cosine_restarts at 0-based update t (point 6); P = 0: no restarts."""
    env = lambda x: rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * x))  # noqa: E731
    if t < w0:
        return t / w0  # first warmup, from 0
    k, j = divmod(t, P) if P else (0, t)  # restart number, position in the cycle
    if k >= 1 and j < wr:
        # restart at t = kP: 0, then linear up to the envelope's value at the end of the re-warmup
        return j / wr * env((k * P + wr - w0) / max(1, T - w0))
    return env((t - w0) / max(1, T - w0))


def lr_multiplier(step, cfg, train):
    """The jagged cosine under --scheduler cosine_restarts (checked at build, before any work); else None."""
    if train.scheduler != "cosine_restarts":
        return None  # train.py's own --scheduler
    P, T, w0, wr = cfg.cycle_length or cfg.relora, train.num_training_steps, train.warmup_steps, cfg.restart_warmup_steps
    if P and T % P:
        raise ValueError(_not_a_multiple(T, P, w0, wr, "--cycle_length" if cfg.cycle_length else "--relora"))
    if w0 > P > 0:
        raise ValueError(f"--warmup_steps {w0} must not exceed the restart period {P} for --scheduler cosine_restarts")
    if P and not 1 <= wr <= P:
        raise ValueError(f"--restart_warmup_steps {wr} must be between 1 and the restart period {P}")
    return jagged_cosine(step, T, w0, wr, P, train.min_lr_ratio)


def _not_a_multiple(T, P, w0, wr, flag):
    """The one-line error for T not a multiple of P, with the settings that would work."""
    fixes = [f"--num_training_steps {' or '.join(str(k * P) for k in (T // P, T // P + 1) if k)}"]
    d = next((d for d in range(min(P, T - 1), 0, -1) if T % d == 0 and d >= max(w0, wr, 1)), None)
    fixes += [f"{flag} {d}"] if d else []
    return (f"--scheduler cosine_restarts (ReLoRA's default) restarts every {P} updates ({flag}), so "
            f"--num_training_steps must be a multiple of {P}, not {T}: use {', '.join(fixes)}, "
            f"or train.py's --scheduler cosine")


# ----------------------------------------------------------------------------- the periodic event


def after_step(step, model, optimizer, cfg, train):
    """After update `step` (0-based): merge-and-reinit every --relora, optimizer reset every cycle."""
    if cfg.relora <= 0:
        return {}  # plain LoRA
    P = cfg.cycle_length or cfg.relora
    merge = step >= cfg.relora and step % cfg.relora == 0
    reset = step >= P and step % P == 0
    if not (merge or reset):
        return {}
    g = _generator(train.seed, step)  # one stream per event, consumed in module order
    out = {}
    if merge:
        for m in model.modules():
            if isinstance(m, ReLoRALinear):
                m.merge_and_reinit(g)
        out["relora_merges"] = step // cfg.relora
    if reset:
        out["optimizer_zeroed_frac"] = reset_optimizer_state(model, optimizer, cfg, g)
    return out
