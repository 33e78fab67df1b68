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

Implementation details (METHODS.md §2)
--------------------------------------
1. Every nn.Linear whose name contains "attn", "attention" or "mlp" (q/k/v/o, gate/up/down)
   becomes a ReLoRALinear. Embeddings, RMSNorm gains and lm_head stay full-rank and trainable
   under the same AdamW (train.py's default optimizer), as in the original.
2. A ~ Kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt n, 1/sqrt n), B = 0: the wrapped model computes
   exactly the function of the plain one at wrap time. LoRA dropout (p = 0.1) acts on the
   adapter's input only.
3. The events fire after the optimizer step of 0-based update t = k P (k >= 1); under
   --scheduler cosine_restarts that step ran at LR 0 and t + 1 is the first re-warmup step. This is
   the original's `(update_step - scheduler_start_step) % relora == 1` with update_step counted
   after the increment. The merge follows --relora, the optimizer reset --cycle_length (= --relora
   unless given), both only when --relora > 0.
4. The merge is computed in float32 and written in place; A is re-drawn from a torch.Generator
   seeded with (seed, t), so every DDP rank draws the same A and a resumed run the same as an
   unbroken one. Parameters are never rebound: optimizer, DDP and compile keep pointing at them.
5. The optimizer reset touches only trainable parameters named "lora_*", and in their Adam state
   only the tensors shaped like the parameter (exp_avg, exp_avg_sq). Adam's `step` is NOT reset.
   Modes (exactly one, else a ValueError): --reset_optimizer_on_relora (zero), or
   --optimizer_random_pruning p (zero each entry with probability p, mask from the (seed, t)
   generator), or --optimizer_magnitude_pruning p (per tensor, keep the n - round(p n) entries
   of largest magnitude).
6. --scheduler cosine_restarts (with w0 = --warmup_steps, w_r = --restart_warmup_steps,
   P = --cycle_length, T = --num_training_steps, rho = --min_lr_ratio,
   env(x) = rho + (1 - rho) (1 + cos(pi x)) / 2):
       t < w0:                 lambda = t / w0
       t >= P, t mod P < w_r:  lambda = (t mod P) / w_r * env((floor(t/P) P + w_r - w0) / (T - w0))
       otherwise:              lambda = env((t - w0) / (T - w0))
   T must be divisible by P and w0 <= P (the original's checks), else a ValueError.
7. Warm start: train.py --warmed_up_model loads a plain model.pt; the step counter, schedule and
   optimizer start from 0, as the original's scheduler_start_step does.
8. export() returns plain weights W + s B A (float32 merge), the state dict of model.GPT.
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
- Merges are computed in float32 (the original adds the delta in the model dtype, bf16).
- Restart randomness comes from a (seed, step) generator, not from lockstep global RNGs.
- Not implemented: --train_scaling (a learnable s = tanh(sigma) re-zeroed at every restart,
  which with B = 0 gets no gradient), 4-bit quantised W, --adjust_step (not needed: our warm start
  restarts the step counter at 0, so schedule and events are aligned by construction),
  ZeroRedundancyOptimizer.

Some warnings
-------------
- Adam's step counter survives the reset, so bias correction is ~1 right after it and the first
  steps of a new adapter are 3-6.6x larger than at steady state (USER_NEEDS.md §2.1). Use
  --scheduler cosine_restarts: with train.py's default `cosine` the resets happen at a high LR.
  The paper's ablation (Table 6) diverged with restarts + reset but no jagged schedule.
- W stays a full-size frozen tensor: the memory saved is gradients and Adam state of W only.
- With dropout > 0 the adapter output is stochastic in train mode; merge invariance holds for
  eval mode (or dropout 0).
- The paper's recipe needs a full-rank warm start; from scratch ReLoRA lands close to LoRA.
- On `tiny` (h = 128, r = 32) the adapter matmuls cost about what the skipped dW saves, and the
  extra small ops and dropout make a step slower than full-rank; ReLoRA saves memory (no gradient
  or Adam state for W), and speed only at scale, where r << h.

Logged at each event: method/relora_merges (merges so far) and method/optimizer_zeroed_frac (the
fraction of LoRA Adam entries that are zero after the reset; 1.0 for the exact reset).

Usage
-----
    python train.py --method relora --scheduler cosine_restarts             # ReLoRA from scratch
    python train.py --method full --num_training_steps 100 --save_dir out/warm   # warm start ...
    python train.py --method relora --scheduler cosine_restarts --warmed_up_model out/warm/model.pt
    python train.py --method relora --relora 0                              # plain LoRA

Defaults: paper (250M README / 1B yaml) vs here (for the `tiny` preset, 500 updates)
    lora_r 128 -> 32, lora_alpha 32 -> 32 (s = 0.25 -> 1), lora_dropout 0.1 -> 0.1,
    relora 5000 / 1000 -> 100, cycle_length = relora, restart_warmup_steps 100 -> 10,
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


TRAIN_DEFAULTS = {"scheduler": "cosine_restarts"}  # the jagged cosine: restarts without it diverged (Table 6)
EVENT_EVERY_UPDATE = {"relora": 1, "restart_warmup_steps": 1}  # a merge and a reset after every update


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
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
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
