"""
SwitchLoRA: low-rank adapters whose vectors are swapped with candidate vectors during training.

Paper: Kaiye Zhou, Shucheng Wang, Jun Xu, "SwitchLoRA: Switched Low-Rank Adaptation Can Learn
Full-Rank Information", 2024, arXiv:2406.06564. Official code: github.com/asfsdsf/SwitchLoRA.
Spec: METHODS.md §3.

The idea. Each adapted linear computes y = W x + s·B·A·x with a frozen W (m×n), trainable
A (r×n) and B (m×r), s = lora_alpha / r = 1/r. A plain LoRA update s·(B·A − B0·A0) has rank at
most 2r (r with B0 = 0), whatever the training does. SwitchLoRA keeps, per layer, a pool of N_c = min(m, n) candidate rows for A
and candidate columns for B. Every step a few of the r active vectors are swapped with candidates,
and W absorbs the difference so the function does not change:
    switch row i of A to candidate c:     W ← W + s·B[:, i]·(A[i, :] − C_A[c]),   A[i, :] ← C_A[c]
    switch column j of B to candidate c:  W ← W + s·(B[:, j] − C_B[c])·A[j, :],   B[:, j] ← C_B[c]
Over training the merged update W + s·B·A − W0 therefore reaches a rank far above r. The number of
vectors switched per step and factor is r / interval(t) with
    interval(t) = interval_0 / 0.3^((t+1)/D),  D = switch_lora_descent_rate · num_training_steps,
so switching slows down 3.33× every D steps and has all but stopped halfway through training.

Implementation details (numbers refer to METHODS.md §3):
 1. Init (§3.2, "switchlora"): gain = sqrt(1/3), std_A = (sqrt(m)·r / n^1.5)^(1/4)·sqrt(gain),
    std_B = (r / sqrt(m·n))^(1/4)·sqrt(gain), uniform bounds sqrt(3)·std; then s·B·A has the variance
    of a default nn.Linear. "origin_lora": std_A = gain/sqrt(n) (Kaiming), std_B = 0. The wrap sets
    W ← W0 − s·B0·A0, so the wrapped model computes exactly what the plain model did.
 2. Candidates are drawn with the same bounds. A's rows start as candidates N_c−r … N_c−1; B's column
    i holds candidate N_c − r + ((i − r/2) mod r). The switch pointers start at 0 (A) and r/2 (B) and
    chase each other round the ring of r slots, so row i of A and column i of B never switch together.
 3. Per layer and step, one stochastic rounding of r/interval(t) gives k, the count for both factors
    (floor, +1 with the fractional part as probability), capped so that a pointer never enters the
    slots still frozen behind the other pointer (§3.3b). Slots are the next k from each pointer.
 4. Continuous mode (default): slot j gets the candidate after the one its predecessor holds (mod N_c):
    the active set is a window sliding round the pool. --discontinuous_switch draws the k candidates
    uniformly without replacement among the candidates that are not active.
 5. The trained vector goes back into the pool slot it was checked out from (it is reused later).
 6. The counterpart of every switched vector (column i of B for row i of A and vice versa) gets zero
    gradient for --adam_warm_step steps, and its Adam moments and its own step counter are zeroed at
    the switch. The switched vector keeps its state: dL/dA[i,:] = s·B[:,i]ᵀ·δ·xᵀ does not depend on
    A[i,:], but dL/dB[:,i] = s·δ·(A[i,:]·x)ᵀ does, so it is the counterpart's statistics that go stale.
 7. StepAdamW is AdamW (PyTorch's decoupled formula) with one step counter per row of A, shape (r, 1),
    and per column of B, shape (1, r), so the bias correction of a re-paired vector restarts.
 8. When (the order): in `before_step`, i.e. after backward and the DDP all-reduce, before clipping
    and optimizer.step(). The switch keeps the function, and the loss is bilinear in (A, B), so the
    gradients already computed are the exact gradients at the switched point for every vector except
    the counterparts, and those are the ones zeroed. optimizer.step() then takes a true gradient step.
 9. Randomness (counts, random candidates, the pools) comes from torch.Generators seeded with
    (train.seed, step) or train.seed: identical on every rank, and resume needs no RNG state.
10. Pools live on the CPU by default (--no_offload_candidates keeps them on the device). They, the
    pointers, the checked-out indices and the freeze counters are plain attributes, not buffers
    (DDP broadcasts buffers at construction, which NCCL cannot do for CPU tensors); they are
    checkpointed through get_state / set_state.

Deviations from the official code:
 - Clipping sees the gradient after the frozen slices are zeroed (official: clip, then zero); the norm
   is that of the update actually applied. This follows from train.py's hook order (item 8).
 - A vector is never switched to a candidate that is currently checked out (k ≤ N_c − r). In the
   official code this can happen when few spare candidates exist; its compensation then uses a stale
   copy and the function changes.
 - The frozen-slot cap pairs each pointer with the other factor's frozen count (the official code
   swaps the two counts, which are always equal, so the result is the same).
 - Not implemented: --switch_lora_drop (blended write-back, default 0), quantized W, rank estimation.
 - Bias corrections are computed in float64 (official: float32 step tensors).

Some warnings:
 - With s = 1/r the adapters move slowly: the paper uses 10-20× the full-rank LR (350M: 0.02 vs 1e-3).
   This file therefore sets train.py's default --lr to 0.01 (TRAIN_DEFAULTS below).
 - A layer with min(m, n) ≤ r never switches (it is plain LoRA). In `tiny` every adapted layer has
   min(m, n) = 128, so r must be well below 128.
 - With --lora_dropout > 0 a switch (like any LoRA merge) keeps the function in eval mode only.
 - Decoupled weight decay still shrinks a frozen vector (as in the official code); the default is 0.
 - Pools cost N_c·(m + n) floats per layer (1-2x the size of W), on the CPU by default; they are
   in every checkpoint.

Logged: method/switched (vectors switched per factor, summed over layers, since the start) and
method/switch_interval (interval(t)), on logging steps.

Usage:
    python train.py --method switchlora                               # tiny, 500 steps, CPU, --lr 0.01
    python train.py --method switchlora --lora_rank 16 --discontinuous_switch
    torchrun --nproc-per-node 2 train.py --method switchlora --check_ranks_every 1

Defaults: paper (350M) vs here. lora_rank 128 (256 for 350M) → 32 here: tiny's layers have
min(m, n) = 128, so r = 128 could never switch. switch_lora_interval 40, descent rate 0.1,
adam_warm_step 5, lora_alpha 1, dropout 0, offload on: as in the paper (they scale with the run
length): on tiny that is about 33 switches per factor and layer, i.e. one turn of the r slots.
LR: paper 0.01-0.02 with batch 1152×512. train.py's own default 3e-3 is tuned for full-rank
training; on tiny (500 steps) SwitchLoRA reaches val loss 1.238 at 0.01 against 1.399 at 3e-3
(full-rank: 1.356 at 3e-3, 1.987 at 0.01), so 0.01 is this method's default.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import materialize


TRAIN_DEFAULTS = {"lr": 1e-2}  # s = 1/r: the adapters need a larger LR than full-rank training


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    lora_rank: int = _f(32, "LoRA rank r (paper: 128; tiny's layers are 128 wide)", aliases=["--lora_r", "--rank"])
    lora_alpha: float = _f(1.0, "alpha; scaling s = alpha / r (the paper hard-codes 1, so s = 1/r)")
    lora_dropout: float = _f(0.0, "dropout on the adapter input")
    init_lora_type: str = _f("switchlora", "switchlora (balanced std_A, std_B) | origin_lora (Kaiming A, zero B)",
                             choices=["switchlora", "origin_lora"])
    switch_lora: bool = _f(True, "switch vectors with candidates (false: plain LoRA with the same init and optimizer)")
    switch_lora_interval: int = _f(40, "interval_0: initial steps between switches of one vector slot")
    switch_lora_descent_rate: float = _f(0.1, "ratio: D = ratio x num_training_steps, interval grows 1/0.3 every D steps")
    switch_descend_type: str = _f("exponential", "how interval grows: exponential | Z", choices=["exponential", "Z"])
    fix_switch_lora_interval: bool = _f(False, "keep interval = interval_0 for the whole run")
    adam_warm_step: int = _f(5, "steps a counterpart stays frozen after its partner is switched")
    discontinuous_switch: bool = _f(False, "draw candidates at random instead of sliding round the pool")
    offload_candidates: bool = _f(True, "keep candidate pools on the CPU (--no_offload_candidates: on the device)")
    zero_init_B: bool = _f(False, "B starts (and its candidates are) zero; B is never switched")
    remain_switch_state: bool = _f(False, "do not zero the counterpart's Adam moments at a switch")
    remain_switch_step_state: bool = _f(False, "do not zero the counterpart's per-row/column Adam step at a switch")


def init_bounds(m, n, r, init_type):
    """Uniform bounds (sqrt(3)·std) for A (r×n) and B (m×r), METHODS.md §3.2."""
    gain = math.sqrt(2 / (1 + 5))  # leaky-ReLU gain with slope sqrt(5), as nn.Linear's Kaiming init
    if init_type == "origin_lora":
        return math.sqrt(3) * gain / math.sqrt(n), 0.0
    std_a = (math.sqrt(m) * r / n ** 1.5) ** 0.25 * math.sqrt(gain)
    std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)  # std_A·std_B = gain·sqrt(r/n)
    return math.sqrt(3) * std_a, math.sqrt(3) * std_b


class SwitchLoRALinear(nn.Module):
    """y = W x + b + s·B·A·x with frozen W, trainable A (r×n), B (m×r) and candidate pools for both."""

    def __init__(self, base: nn.Linear, cfg: Config, gen: torch.Generator):
        super().__init__()
        m, n, r, dev = base.out_features, base.in_features, cfg.lora_rank, base.weight.device
        dt = base.weight.dtype
        self.r, self.scaling, self.n_c = r, cfg.lora_alpha / r, min(m, n)
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: W keeps its state-dict name
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, n, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(m, r, device=dev, dtype=dt))
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        bound_a, bound_b = init_bounds(m, n, r, cfg.init_lora_type)
        bound_b = 0.0 if cfg.zero_init_B else bound_b
        uniform = lambda rows, cols, b: (torch.rand(rows, cols, generator=gen, dtype=dt) * 2 - 1) * b  # noqa: E731
        # METHOD: a layer with no spare candidate (N_c <= r) is plain LoRA and never switches
        self.switchable = cfg.switch_lora and self.n_c - r > 0
        self.switch_B = not cfg.zero_init_B
        with torch.no_grad():
            if self.switchable:
                pool_dev = torch.device("cpu") if cfg.offload_candidates else dev
                self.candidates_A = uniform(self.n_c, n, bound_a).to(pool_dev)  # C_A: (N_c, n) rows for A
                self.candidates_B = uniform(self.n_c, m, bound_b).to(pool_dev)  # C_B: (N_c, m) columns for B
                if cfg.discontinuous_switch:
                    sel_a = torch.randperm(self.n_c, generator=gen)[:r]
                    sel_b = torch.randperm(self.n_c, generator=gen)[:r]
                else:
                    sel_a = torch.arange(self.n_c - r, self.n_c)
                    sel_b = sel_a.clone()
                # column i of B holds the candidate of slot (i - r/2) mod r: B's window lags A's by r/2
                self.selected_A, self.selected_B = sel_a, sel_b[(torch.arange(r) - r // 2) % r]
                self.lora_A.copy_(self.candidates_A[self.selected_A.to(pool_dev)])
                self.lora_B.copy_(self.candidates_B[self.selected_B.to(pool_dev)].t())
                self.ptr_A, self.ptr_B = 0, r // 2  # c_A, c_B: next slot to switch
                self.frozen_A = torch.zeros(r, dtype=torch.long)  # steps left with zero gradient, per row of A
                self.frozen_B = torch.zeros(r, dtype=torch.long)  # ... per column of B
                self.n_switched = 0
            else:
                self.lora_A.copy_(uniform(r, n, bound_a))
                self.lora_B.copy_(uniform(m, r, bound_b))
            # W <- W0 - s·B0·A0: the wrapped layer computes W0 x at step 0
            self.weight.addmm_(self.lora_B, self.lora_A, alpha=-self.scaling)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged_weight(self):
        return torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scaling)  # W + s·B·A

    def max_switch(self):
        """k_max: how far each pointer may advance without entering slots still frozen behind the other."""
        gap_a = (self.ptr_B - self.ptr_A) % self.r - int((self.frozen_A > 0).sum())
        gap_b = (self.ptr_A - self.ptr_B) % self.r - int((self.frozen_B > 0).sum())
        return max(0, min(gap_a, gap_b, self.n_c - self.r))

    def _new_candidates(self, selected, slots, discontinuous, gen):
        if discontinuous:  # uniform, without replacement, among the candidates that are not checked out
            free = torch.ones(self.n_c, dtype=torch.bool)
            free[selected] = False
            free = free.nonzero().squeeze(1)
            return free[torch.randperm(len(free), generator=gen)[:len(slots)]]
        # continuous: the window slides on, slot j takes the candidate after its predecessor's
        first = selected[(slots[0] - 1) % self.r] + 1
        return (first + torch.arange(len(slots))) % self.n_c

    @torch.no_grad()
    def _switch_rows(self, rows, other, w, pool, selected, slots, cand):
        """Swap rows[slots] with pool[cand]; rows (r, d), other (e, r) and w (e, d) may be transposed views."""
        dev = rows.device
        new = pool[cand.to(pool.device)].to(dev, rows.dtype)  # (k, d)
        old = rows[slots.to(dev)]  # (k, d): the trained vectors
        w.addmm_(other[:, slots.to(dev)], old - new, alpha=self.scaling)  # W + s·other_k·(old − new): W + s·B·A kept
        pool[selected[slots].to(pool.device)] = old.to(pool.device)  # write the trained vectors back
        rows[slots.to(dev)] = new
        selected[slots] = cand

    @torch.no_grad()
    def switch(self, k, warm, discontinuous, gen):
        """Switch k rows of A and k columns of B; returns (slots of A, slots of B) that were switched."""
        slots_a = (self.ptr_A + torch.arange(k)) % self.r
        slots_b = (self.ptr_B + torch.arange(k)) % self.r
        cand = self._new_candidates(self.selected_A, slots_a, discontinuous, gen)
        self._switch_rows(self.lora_A, self.lora_B, self.weight, self.candidates_A, self.selected_A, slots_a, cand)
        self.frozen_B[slots_a] = warm  # column i of B now pairs with a new row i of A
        if self.switch_B:  # B after A, as the official code (the slot sets are disjoint anyway)
            cand = self._new_candidates(self.selected_B, slots_b, discontinuous, gen)
            self._switch_rows(self.lora_B.t(), self.lora_A.t(), self.weight.t(), self.candidates_B,
                              self.selected_B, slots_b, cand)
            self.frozen_A[slots_b] = warm
        else:
            slots_b = slots_b[:0]
        self.ptr_A, self.ptr_B = (self.ptr_A + k) % self.r, (self.ptr_B + k) % self.r
        self.n_switched += k
        return slots_a, slots_b

    @torch.no_grad()
    def freeze_grads(self):
        """Zero the gradient of frozen rows of A / columns of B and count their freeze down (§3.3f)."""
        for p, frozen, dim in ((self.lora_A, self.frozen_A, 0), (self.lora_B, self.frozen_B, 1)):
            if p.grad is not None and bool((frozen > 0).any()):
                keep = (frozen == 0).to(p.device, p.grad.dtype)
                p.grad.mul_(keep.unsqueeze(1) if dim == 0 else keep.unsqueeze(0))
            frozen.sub_(1).clamp_(min=0)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchLoRALinear)]


def wrap(model, cfg, train):
    """Replace every attn/mlp nn.Linear with a SwitchLoRALinear (METHODS.md §1, §3.1)."""
    if cfg.lora_rank < 1:
        raise ValueError(f"--lora_rank must be at least 1, got {cfg.lora_rank}")
    if cfg.adam_warm_step < 0:
        raise ValueError(f"--adam_warm_step must be 0 or more, got {cfg.adam_warm_step}")
    if cfg.switch_lora and not cfg.fix_switch_lora_interval and cfg.switch_lora_descent_rate <= 0:
        raise ValueError("--switch_lora_descent_rate must be positive (or use --fix_switch_lora_interval)")
    if cfg.switch_lora and switch_interval(0, cfg, train) < 2 * cfg.adam_warm_step:
        raise ValueError(f"--switch_lora_interval {cfg.switch_lora_interval} is below 2 x --adam_warm_step "
                         f"{cfg.adam_warm_step}: a slot would be switched again while still frozen")
    gen = torch.Generator().manual_seed(train.seed)  # pools and init: identical on every rank
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        s in n for s in ("attn", "attention", "mlp"))]
    for name in names:
        base = materialize(model, name)  # real weights for this layer only (the GPT may be a meta skeleton)
        if cfg.lora_rank > min(base.in_features, base.out_features):
            raise ValueError(f"--lora_rank {cfg.lora_rank} exceeds min(in, out) = "
                             f"{min(base.in_features, base.out_features)} of {name}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SwitchLoRALinear(base, cfg, gen))
    if cfg.switch_lora and not any(m.switchable for _, m in lora_layers(model)) and train.rank == 0:
        print(f"switchlora: no layer has more than r = {cfg.lora_rank} candidates; nothing will switch (plain LoRA)")
    return model


# ----------------------------------------------------------------------------- optimizer


class StepAdamW(torch.optim.Optimizer):
    """AdamW (torch's decoupled formula) with a per-row (lora_A) or per-column (lora_B) step counter.

    A param group's "step_dim" is 0 for lora_A (state['step'] of shape (r, 1)), 1 for lora_B
    (shape (1, r)) and -1 for everything else (a scalar step, exactly torch.optim.AdamW)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step_dim=-1))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, dim = group["betas"], group["lr"], group["step_dim"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    shape = () if dim < 0 else (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
                    st["step"] = torch.zeros(shape, dtype=torch.float32, device="cpu" if dim < 0 else p.device)
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                st["step"] += 1  # every row counts, frozen ones too
                p.mul_(1 - lr * group["weight_decay"])
                m.lerp_(g, 1 - beta1)  # m <- b1·m + (1 − b1)·g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v <- b2·v + (1 − b2)·g²
                t = st["step"].double()
                step_size = (lr / (1 - beta1 ** t)).to(p.dtype)  # lr / (1 − b1^t), per row or column
                denom = (v.sqrt() / (1 - beta2 ** t).sqrt().to(p.dtype)).add_(group["eps"])
                p.addcdiv_(m * -step_size.to(p.device), denom)  # p <- p − lr·m̂ / (sqrt(v̂) + eps)
        return loss


def make_optimizer(model, cfg, train):
    """Groups: lora_A (per-row step), lora_B (per-column step), other matrices, vectors (no decay)."""
    a = [m.lora_A for _, m in lora_layers(model)]
    b = [m.lora_B for _, m in lora_layers(model)]
    lora = {id(p) for p in a + b}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in lora]
    wd = train.weight_decay
    groups = [dict(params=a, step_dim=0, weight_decay=wd), dict(params=b, step_dim=1, weight_decay=wd),
              dict(params=[p for p in rest if p.dim() >= 2], weight_decay=wd),
              dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0)]
    return StepAdamW([g for g in groups if g["params"]], lr=train.lr,
                     betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)


def zero_counterpart_state(layer, opt, slots_a, slots_b, cfg):
    """After A-rows slots_a and B-columns slots_b were switched, zero the state of B-columns slots_a and
    A-rows slots_b: the counterparts, whose gradient statistics went stale (§3.3e)."""
    for p, slots, dim in ((layer.lora_B, slots_a, 1), (layer.lora_A, slots_b, 0)):
        st = opt.state.get(p)
        if not st or len(slots) == 0:
            continue  # no state before the first optimizer step: it starts at zero anyway
        idx = slots.to(p.device)
        if not cfg.remain_switch_state:
            st["exp_avg"].index_fill_(dim, idx, 0.0)
            st["exp_avg_sq"].index_fill_(dim, idx, 0.0)
        if not cfg.remain_switch_step_state and st["step"].dim() == 2:
            st["step"].index_fill_(dim, idx, 0.0)


# ----------------------------------------------------------------------------- the switch, every step


def switch_interval(step, cfg, train):
    """interval(t) = interval_0 / rate(t), rate = 0.3^((t+1)/D) ("exponential") or 1 − sigmoid((10/D)(t − D))."""
    if cfg.fix_switch_lora_interval:
        return float(cfg.switch_lora_interval)
    D = cfg.switch_lora_descent_rate * train.num_training_steps
    if cfg.switch_descend_type == "Z":
        rate = 1 - 1 / (1 + math.exp(-10 / D * (step - D)))
    else:
        rate = 0.3 ** ((step + 1) / D)
    return cfg.switch_lora_interval / max(rate, 1e-8)


def before_step(step, model, opt, cfg, train):
    """METHOD: after backward, before clipping and opt.step(): switch, reset counterparts, freeze."""
    layers = [m for _, m in lora_layers(model) if m.switchable]
    if not layers:
        return {}
    gen = torch.Generator().manual_seed(train.seed * 1_000_003 + step)  # same draws on every rank
    expected = cfg.lora_rank / switch_interval(step, cfg, train)
    u = torch.rand(len(layers), generator=gen, dtype=torch.float64)
    for layer, ui in zip(layers, u.tolist()):
        # stochastic rounding of r / interval(t): floor, +1 with probability of the fractional part
        k = min(int(expected) + (ui < expected - int(expected)), layer.max_switch())
        if k > 0:
            slots_a, slots_b = layer.switch(k, cfg.adam_warm_step, cfg.discontinuous_switch, gen)
            zero_counterpart_state(layer, opt, slots_a, slots_b, cfg)
        layer.freeze_grads()
    if (step + 1) % train.log_every:
        return {}
    return {"switched": sum(m.n_switched for m in layers), "switch_interval": switch_interval(step, cfg, train)}


# ----------------------------------------------------------------------------- checkpoint and export

_STATE = ("candidates_A", "candidates_B", "selected_A", "selected_B", "frozen_A", "frozen_B")


def get_state(model, opt, cfg):
    """Pools, checked-out indices, freeze counters and pointers: everything that is not a Parameter."""
    return {name: {**{k: getattr(m, k) for k in _STATE}, "ptr_A": m.ptr_A, "ptr_B": m.ptr_B, "n_switched": m.n_switched}
            for name, m in lora_layers(model) if m.switchable}


def set_state(model, opt, cfg, state):
    for name, m in lora_layers(model):
        if m.switchable and name in state:
            for k in _STATE:
                getattr(m, k).copy_(state[name][k])  # copy_ keeps each tensor where it lives (CPU pools)
            m.ptr_A, m.ptr_B, m.n_switched = int(state[name]["ptr_A"]), int(state[name]["ptr_B"]), int(state[name]["n_switched"])


@torch.no_grad()
def export(model, cfg):
    """A plain GPT state dict: W + s·B·A per adapted layer; the training model is left as it is."""
    sd = dict(model.state_dict())
    for name, m in lora_layers(model):
        sd[name + ".weight"] = m.merged_weight()
        del sd[name + ".lora_A"], sd[name + ".lora_B"]
    return sd
