"""
SwitchLoRA: low-rank adapters whose vectors are swapped with candidate vectors during training.

Paper: Kaiye Zhou, Shucheng Wang, Jun Xu, "SwitchLoRA: Switched Low-Rank Adaptation Can Learn
Full-Rank Information", 2024, arXiv:2406.06564. Official code: github.com/asfsdsf/SwitchLoRA
(switchlora/switch_lora.py for the switch, switchlora/optimizer.py for StepAdamW, llama/main.py).

The idea. Each adapted linear computes y = W x + s·B·A·x with a frozen W (m×n), trainable
A (r×n) and B (m×r), s = lora_alpha / r = 1/r. A plain LoRA update s·(B·A − B0·A0) has rank at
most 2r (r with B0 = 0), whatever the training does. SwitchLoRA keeps, per layer, a pool of
N_c = min(m, n) candidate rows for A and candidate columns for B. Every update a few of the r
active vectors are swapped with candidates, and W absorbs the difference so the function does not change:
    switch row i of A to candidate c:     W ← W + s·B[:, i]·(A[i, :] − C_A[c]),   A[i, :] ← C_A[c]
    switch column j of B to candidate c:  W ← W + s·(B[:, j] − C_B[c])·A[j, :],   B[:, j] ← C_B[c]
Over training the merged update W + s·B·A − W0 therefore reaches a rank far above r. The number of
vectors switched per update and factor is r / interval(t) with
    interval(t) = interval_0 / 0.3^((t+1)/D),  D = switch_lora_descent_rate · num_training_steps,
so switching slows down 3.33× every D updates and has all but stopped halfway through training.

Implementation details:
 1. Init ("switchlora"): gain = sqrt(1/3), std_A = (sqrt(m)·r / n^1.5)^(1/4)·sqrt(gain),
    std_B = (r / sqrt(m·n))^(1/4)·sqrt(gain), uniform bounds sqrt(3)·std; then s·B·A has the variance
    of a default nn.Linear. "origin_lora": std_A = gain/sqrt(n) (Kaiming), std_B = 0. The wrap sets
    W ← W0 − s·B0·A0, so the wrapped model computes what the plain model did.
 2. Candidates are drawn with the same bounds. A's rows start as candidates N_c−r … N_c−1; B's column
    i holds candidate N_c − r + ((i − r/2) mod r). The switch pointers start at 0 (A) and r/2 (B) and
    chase each other round the ring of r slots, so row i of A and column i of B never switch together.
 3. Per layer and update, one stochastic rounding of r/interval(t) gives k, the count for both factors
    (floor, +1 with the fractional part as probability), capped so that neither pointer reaches a
    slot whose own vector is still frozen: frozen rows of A sit just behind B's pointer (B's switches
    froze them), so k ≤ (c_B − c_A) mod r − #frozen rows of A, k ≤ (c_A − c_B) mod r − #frozen
    columns of B, and k ≤ N_c − r. The slots are the next k from each pointer.
 4. Continuous mode (default): slot j gets the candidate after the one its predecessor holds (mod N_c):
    the active set is a window sliding round the pool. --discontinuous_switch draws the k candidates
    uniformly without replacement among the candidates that are not active.
 5. The trained vector goes back into the pool slot it was checked out from (it is reused later).
 6. The counterpart of every switched vector (column i of B for row i of A and vice versa) gets zero
    gradient for --adam_warm_step updates, and its Adam moments and its own step counter are zeroed at
    the switch. The switched vector keeps its state: dL/dA[i,:] = s·B[:,i]ᵀ·δ·xᵀ does not depend on
    A[i,:], but dL/dB[:,i] = s·δ·(A[i,:]·x)ᵀ does, so it is the counterpart's statistics that go stale.
    --remain_switch_state leaves all of the counterpart's state alone (moments and step);
    --remain_switch_step_state zeroes the moments but keeps its step.
 7. StepAdamW is AdamW (PyTorch's decoupled formula) with one step counter per row of A, shape (r, 1),
    and per column of B, shape (1, r), so the bias correction of a re-paired vector restarts.
 8. When (the order): in `before_step`, i.e. after backward and the DDP all-reduce, before clipping
    and optimizer.step(). The switch keeps the function, and the loss is bilinear in (A, B), so the
    gradients already computed are the exact gradients at the switched point for every vector except
    the counterparts, and those are the ones zeroed. optimizer.step() then takes a true gradient step.
    (--per_layer_updates: the same per layer, inside the backward; see Modes.)
 9. Randomness: pools and init from a CPU torch.Generator seeded with (seed, layer name); the counts
    and random candidates from a numpy Generator seeded with (seed, update, layer index) (official:
    numpy's global RNG). Every rank draws the same, in any layer order, and resume needs no RNG state.
10. Bookkeeping is plain Python/numpy (pointers, checked-out indices, freeze counters, counts): no
    decision reads a tensor, so the event runs on fake tensors (memory.py). Pools are tensors, kept as
    attributes, not buffers (DDP broadcasts buffers at construction, which NCCL cannot do for CPU
    tensors). All of it is checkpointed through get_state / set_state.

Modes:
 - --storage_dtype float32 (default): everything float32. bfloat16: W, the pools, embeddings, norms
   and lm_head are bf16 (the original repositories' pure-bf16 model), but A and B stay float32 masters (cast to
   bf16 in the forward), with float32 gradients and Adam state. With s = 1/r and Adam, an update moves
   an entry of A or B by about lr (1e-3 late in a cosine run) while bf16's spacing near the entries'
   typical 0.45 (llama_1b, r 256) is 0.002: bf16 factors would round most late updates away. The cost
   is 8 bytes more per adapter parameter (llama_1b, r 256: 239M of them, +1.8 GiB), and the peak stays
   below full-rank's (numbers below). Pools in bf16: a parked vector is rounded once, and every switch
   compensates with the rounded value, so the function is kept. W's compensation is summed in float32
   and rounded to bf16 once per switch (a switch changes the logits by bf16 rounding only).
 - Candidate pools on train.offload_device (the CPU) by default; --no_offload_candidates keeps them
   on the device.
 - --per_layer_updates: each factor is stepped inside the backward as soon as both gradients of its
   layer exist: the first of A and B to arrive is held back (param_step) until the second arrives,
   then the layer switches, zeroes its counterparts' state and gradients, and both are stepped. W is
   still needed by the rest of the backward (dL/dx of this layer), so its compensation waits in the
   layer (2k·(m + n) floats) and is folded in after_step. Same result as the default order.

Memory: peak GiB of the most expensive update (the switch at every update), estimated by memory.py on
fake tensors (checked against a real CPU run: --check on tiny and llama_9m agrees to 0.0%). r 256,
micro-batch 1 x 256 tokens, vocabulary 32000; host = the offloaded pools:
    python memory.py --methods full,switchlora --model_config llama_1b --method_args "switchlora=--lora_rank 256"
    (and with --storage_dtype bfloat16, --model_config llama_7b, --per_layer_updates --grad_clipping 0)
                         default order                 --per_layer_updates
                         full-rank  SwitchLoRA  ratio  full-rank  SwitchLoRA  ratio   host
    llama_1b  float32      24.96      12.39     0.50x    18.37      12.76     0.69x    7.1
    llama_1b  bfloat16     12.49       7.05     0.56x     8.28       7.04     0.85x    3.6
    llama_7b  float32     125.53      49.98     0.40x    90.11      50.72     0.56x   38.1
    llama_7b  bfloat16     62.77      24.06     0.38x    39.59      24.08     0.61x   19.1
The paper's abstract reports about 13% less memory than full-rank (LLaMA 1.3B) under its own
setup; at micro-batch 1 the weights, gradients and Adam state dominate, and those are what
SwitchLoRA shrinks. Per-layer updates free full-rank's large gradients but gain SwitchLoRA
nothing (its gradients are small; the held factor and the pending compensations cost a little).
In float32 storage the peak is in the backward, where the bf16 autocast copies of the frozen W
(saved for dL/dx) hold 2.3 GiB (1b) and 12 GiB (7b).

Deviations from the official code:
 - Clipping sees the gradient after the frozen slices are zeroed (official: clip, then zero); the norm
   is that of the update actually applied. This follows from train.py's hook order (item 8).
 - A vector is never switched to a candidate that is currently checked out (k ≤ N_c − r). In the
   official code this can happen when few spare candidates exist; its compensation then uses a stale
   copy and the function changes.
 - The frozen-slot cap (item 3) pairs each pointer with its own factor's frozen count; the official
   code pairs it with the other factor's. The two counts are equal whenever B switches, so the result
   is the same. With --zero_init_B only A switches, no row of A is ever frozen and the counts differ:
   the official cap is then r//2 − #frozen columns of B, this file's min(r//2, r − r//2 − #frozen
   columns of B), one larger for odd r while a column is frozen (adam_warm_step ≥ 2). Neither lets a
   pointer reach a frozen vector or A re-switch a row whose column is still frozen.
 - Weight decay follows train.py: 2-D tensors only (A, B, embeddings, lm_head); the official decays
   every trainable tensor, the norm gains too. Both default to 0; in both, decoupled decay still
   shrinks a frozen vector (its gradient is zero, its weight is not).
 - bf16: the official model is pure bf16, A, B and their Adam state included; here A and B stay
   float32 (Modes). Bias corrections of A and B are float64 (official: float32 step tensors).
 - Not implemented: --switch_lora_drop (blended write-back, default 0), quantized W, rank estimation.

Some warnings:
 - With s = 1/r the adapters move slowly: the paper uses 10-20× the full-rank LR (350M: 0.02 vs 1e-3).
   This file therefore sets its own default --lr, 0.032 on tiny (TRAIN_DEFAULTS below).
 - A layer with min(m, n) ≤ r never switches (it is plain LoRA); neither does r = 1 (the two
   pointers coincide). In `tiny` every adapted layer has min(m, n) = 128, so r must be well below 128.
 - With --lora_dropout > 0 a switch (like any LoRA merge) keeps the function in eval mode only.
 - bf16 storage: every switch rounds all of W to bf16 once more (as in the official pure-bf16 runs).
 - Pools cost N_c·(m + n) values per layer (1-2x the size of W), on the CPU by default; they are
   in every checkpoint.

Logged: method/switched (vectors switched per factor, summed over layers, since the start) and
method/switch_interval (interval(t)), on logging steps.

Usage:
    python train.py --method switchlora                               # tiny, 500 steps, CPU, --lr 0.032
    python train.py --method switchlora --lora_rank 16 --discontinuous_switch
    torchrun --nproc-per-node 2 train.py --method switchlora --check_ranks_every 1
    python train.py --method switchlora --storage_dtype bfloat16 --per_layer_updates --grad_clipping 0

Defaults: paper (350M) vs here. lora_rank 128 (256 for 350M) → 32 here: tiny's layers have
min(m, n) = 128, so r = 128 could never switch. switch_lora_interval 40, descent rate 0.1,
adam_warm_step 5, lora_alpha 1, dropout 0, offload on: as in the paper (they scale with the run
length): on tiny that is about 33 switches per factor and layer, i.e. one turn of the r slots.
LR: paper 0.01-0.02 with batch 1152×512. train.py's own default (2e-3) is full-rank's best on tiny;
SwitchLoRA's best there is 16x larger. The README's LR sweep (1,000 updates, seeds 0 and 1, validation
loss) gives 1.2055 / 1.1568 / 1.1372 / 1.1233 / 1.1426 / 3.10 (diverged) at 0.004 / 0.008 /
0.016 / 0.032 / 0.064 / 0.128, so 0.032 is this method's default (full-rank: 1.1671 at its best,
2e-3). The embeddings, head and norms train at that LR too; the README's "What it shows" measures
how much of SwitchLoRA's lead that explains.
"""

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import materialize


TRAIN_DEFAULTS = {"lr": 3.2e-2}  # s = 1/r: the adapters need a larger LR; best on tiny in the README's sweep
# memory.py: a switch at every update, at the fastest rate the default --adam_warm_step 5 allows
EVENT_EVERY_UPDATE = {"fix_switch_lora_interval": True, "switch_lora_interval": 10}


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
    switch_lora_interval: int = _f(40, "interval_0: initial updates between switches of one vector slot")
    switch_lora_descent_rate: float = _f(0.1, "ratio: D = ratio x num_training_steps, interval grows 1/0.3 every D updates")
    switch_descend_type: str = _f("exponential", "how interval grows: exponential | Z", choices=["exponential", "Z"])
    fix_switch_lora_interval: bool = _f(False, "keep interval = interval_0 for the whole run")
    adam_warm_step: int = _f(5, "updates a counterpart stays frozen after its partner is switched")
    discontinuous_switch: bool = _f(False, "draw candidates at random instead of sliding round the pool")
    offload_candidates: bool = _f(True, "keep candidate pools on the host (--no_offload_candidates: on the device)")
    zero_init_B: bool = _f(False, "B starts (and its candidates are) zero; B is never switched")
    remain_switch_state: bool = _f(False, "leave the counterpart's Adam state (moments and step) alone at a switch")
    remain_switch_step_state: bool = _f(False, "zero the counterpart's moments but keep its per-row/column step")


def init_bounds(m, n, r, init_type):
    """Uniform bounds (sqrt(3)·std) for A (r×n) and B (m×r) (implementation detail 1)."""
    gain = math.sqrt(2 / (1 + 5))  # leaky-ReLU gain with slope sqrt(5), as nn.Linear's Kaiming init
    if init_type == "origin_lora":
        return math.sqrt(3) * gain / math.sqrt(n), 0.0
    std_a = (math.sqrt(m) * r / n ** 1.5) ** 0.25 * math.sqrt(gain)
    std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)  # std_A·std_B = gain·sqrt(r/n)
    return math.sqrt(3) * std_a, math.sqrt(3) * std_b


class SwitchLoRALinear(nn.Module):
    """y = W x + b + s·B·A·x with frozen W, trainable A (r×n), B (m×r) and candidate pools for both."""

    def __init__(self, base: nn.Linear, cfg: Config, gen: torch.Generator, pool_device):
        super().__init__()
        m, n, r, dev, dt = base.out_features, base.in_features, cfg.lora_rank, base.weight.device, base.weight.dtype
        self.r, self.scaling, self.n_c = r, cfg.lora_alpha / r, min(m, n)
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: W keeps its state-dict name
        self.weight.requires_grad_(False)
        adt = torch.promote_types(dt, torch.float32)  # float32 masters under bf16 storage (see Modes)
        self.lora_A = nn.Parameter(torch.empty(r, n, device=dev, dtype=adt))
        self.lora_B = nn.Parameter(torch.empty(m, r, device=dev, dtype=adt))
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        bound_a, bound_b = init_bounds(m, n, r, cfg.init_lora_type)
        bound_b = 0.0 if cfg.zero_init_B else bound_b
        uniform = lambda rows, cols, b: (torch.rand(rows, cols, generator=gen) * 2 - 1) * b  # noqa: E731 (CPU, float32)
        # METHOD: a layer with no spare candidate (N_c <= r) is plain LoRA and never switches
        self.switchable = cfg.switch_lora and self.n_c - r > 0
        self.switch_B = not cfg.zero_init_B
        self.pending = []  # W's compensations not folded in yet: (left (m, k), right (k, n)) pairs
        self.held = None  # --per_layer_updates: the gradient of the factor that arrived first
        with torch.no_grad():
            if self.switchable:
                cand_a = uniform(self.n_c, n, bound_a).to(dt)  # C_A: (N_c, n) rows for A
                cand_b = uniform(self.n_c, m, bound_b).to(dt)  # C_B: (N_c, m) columns for B
                if cfg.discontinuous_switch:
                    sel_a = torch.randperm(self.n_c, generator=gen)[:r].numpy()
                    sel_b = torch.randperm(self.n_c, generator=gen)[:r].numpy()
                else:
                    sel_a = np.arange(self.n_c - r, self.n_c)
                    sel_b = sel_a.copy()
                # column i of B holds the candidate of slot (i - r/2) mod r: B's window lags A's by r/2
                self.selected_A, self.selected_B = sel_a, sel_b[(np.arange(r) - r // 2) % r]
                self.lora_A.copy_(cand_a[self.selected_A])
                self.lora_B.copy_(cand_b[self.selected_B].t())
                self.candidates_A, self.candidates_B = cand_a.to(pool_device), cand_b.to(pool_device)
                self.ptr_A, self.ptr_B = 0, r // 2  # c_A, c_B: next slot to switch
                self.frozen_A = np.zeros(r, dtype=np.int64)  # updates left with zero gradient, per row of A
                self.frozen_B = np.zeros(r, dtype=np.int64)  # ... per column of B
                self.n_switched = 0
            else:
                self.lora_A.copy_(uniform(r, n, bound_a))
                self.lora_B.copy_(uniform(m, r, bound_b))
            self.pending.append((-self.lora_B, self.lora_A))  # W <- W0 - s·B0·A0: the layer computes W0 x
            self.fold()

    def forward(self, x):
        a, b = self.lora_A.to(self.weight.dtype), self.lora_B.to(self.weight.dtype)  # bf16 storage: bf16 compute
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(self.dropout(x), a), b)

    def merged_weight(self):
        """W + s·B·A, summed in at least float32, in W's dtype."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        merged = torch.addmm(self.weight.to(acc), self.lora_B.to(acc), self.lora_A.to(acc), alpha=self.scaling)
        return merged.to(self.weight.dtype)

    @torch.no_grad()
    def fold(self):
        """W <- W + s·Σ left·right over the pending compensations, in at least float32, rounded to W's dtype once."""
        if not self.pending:
            return
        acc = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))  # W itself unless W is bf16
        for left, right in self.pending:
            acc.addmm_(left.to(acc.dtype), right.to(acc.dtype), alpha=self.scaling)
        if acc is not self.weight:
            self.weight.copy_(acc)
        self.pending.clear()

    def max_switch(self):
        """k_max (detail 3): how far both pointers may advance without reaching a slot frozen in its own factor."""
        gap_a = (self.ptr_B - self.ptr_A) % self.r - int(np.count_nonzero(self.frozen_A))
        gap_b = (self.ptr_A - self.ptr_B) % self.r - int(np.count_nonzero(self.frozen_B))
        return max(0, min(gap_a, gap_b, self.n_c - self.r))

    def _swap(self, rows, pool, selected, slots, rng):
        """rows[slots] <- candidates, the trained vectors back into their pool slots; rows is A (r, n) or
        Bᵀ (r, m), selected its checked-out indices (numpy). rng: numpy Generator (discontinuous) or None.
        -> old − new, (k, d)."""
        if rng is None:  # continuous: slot j takes the candidate after the one its predecessor holds
            cand = (selected[(slots[0] - 1) % self.r] + 1 + np.arange(len(slots))) % self.n_c
        else:  # uniformly, without replacement, among the candidates that are not checked out
            cand = rng.choice(np.setdiff1d(np.arange(self.n_c), selected), size=len(slots), replace=False)
        i = torch.as_tensor(slots, device=rows.device)
        new = pool[torch.as_tensor(cand, device=pool.device)].to(rows.device, rows.dtype)  # (k, d)
        old = rows[i]  # (k, d): the trained vectors
        pool[torch.as_tensor(selected[slots], device=pool.device)] = old.to(pool.device, pool.dtype)
        rows[i] = new
        selected[slots] = cand
        return old - new

    @torch.no_grad()
    def switch(self, k, warm, rng=None):
        """Switch the k rows of A after A's pointer and the k columns of B after B's pointer, freeze their
        counterparts for `warm` updates and queue W's compensation (fold() applies it).
        -> (slots of A, slots of B) that were switched, numpy."""
        slots_a = (self.ptr_A + np.arange(k)) % self.r
        slots_b = (self.ptr_B + np.arange(k)) % self.r if self.switch_B else np.arange(0)
        left = self.lora_B[:, torch.as_tensor(slots_a, device=self.lora_B.device)]  # (m, k): B[:, i] before anything moves
        self.pending.append((left, self._swap(self.lora_A, self.candidates_A, self.selected_A, slots_a, rng)))
        self.frozen_B[slots_a] = warm  # column i of B now pairs with a new row i of A
        if self.switch_B:  # B after A, as the official code (the slot sets are disjoint anyway)
            right = self.lora_A[torch.as_tensor(slots_b, device=self.lora_A.device)]  # (k, n)
            diff = self._swap(self.lora_B.t(), self.candidates_B, self.selected_B, slots_b, rng)  # (k, m)
            self.pending.append((diff.t(), right))
            self.frozen_A[slots_b] = warm
        self.ptr_A, self.ptr_B = (self.ptr_A + k) % self.r, (self.ptr_B + k) % self.r
        self.n_switched += k
        return slots_a, slots_b

    @torch.no_grad()
    def freeze_grads(self):
        """Zero the gradient of frozen rows of A / columns of B and count their freeze down (detail 6)."""
        for p, frozen, dim in ((self.lora_A, self.frozen_A, 0), (self.lora_B, self.frozen_B, 1)):
            idx = np.flatnonzero(frozen)
            if p.grad is not None and len(idx):
                p.grad.index_fill_(dim, torch.as_tensor(idx, device=p.device), 0.0)
            np.maximum(frozen - 1, 0, out=frozen)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwitchLoRALinear)]


def wrap(model, cfg, train):
    """Replace every attn/mlp nn.Linear with a SwitchLoRALinear, one layer at a time."""
    if cfg.lora_rank < 1:
        raise ValueError(f"--lora_rank must be at least 1, got {cfg.lora_rank}")
    if cfg.adam_warm_step < 0:
        raise ValueError(f"--adam_warm_step must be 0 or more, got {cfg.adam_warm_step}")
    if cfg.switch_lora and not cfg.fix_switch_lora_interval and cfg.switch_lora_descent_rate <= 0:
        raise ValueError("--switch_lora_descent_rate must be positive (or use --fix_switch_lora_interval)")
    if cfg.switch_lora and switch_interval(0, cfg, train) < 2 * cfg.adam_warm_step:
        raise ValueError(f"--switch_lora_interval {cfg.switch_lora_interval} is below 2 x --adam_warm_step "
                         f"{cfg.adam_warm_step}: a slot would be switched again while still frozen")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(
        s in n for s in ("attn", "attention", "mlp"))]
    for name in names:
        base = materialize(model, name)  # real weights for this layer only (the GPT may be a meta skeleton)
        if cfg.lora_rank > min(base.in_features, base.out_features):
            raise ValueError(f"--lora_rank {cfg.lora_rank} exceeds min(in, out) = "
                             f"{min(base.in_features, base.out_features)} of {name}")
        gen = torch.Generator().manual_seed(train.seed * 1_000_003 + zlib.crc32(name.encode()))  # same on every rank
        pools = torch.device(train.offload_device) if cfg.offload_candidates else base.weight.device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SwitchLoRALinear(base, cfg, gen, pools))
    if cfg.switch_lora and not any(m.switchable for _, m in lora_layers(model)) and train.rank == 0:
        print(f"switchlora: no layer has more than r = {cfg.lora_rank} candidates; nothing will switch (plain LoRA)")
    return model


# ----------------------------------------------------------------------------- optimizer


class StepAdamW(torch.optim.Optimizer):
    """AdamW (torch's decoupled formula) with a per-row (lora_A) or per-column (lora_B) step counter.

    A param group's "step_dim" is 0 for lora_A (state['step'] of shape (r, 1)), 1 for lora_B
    (shape (1, r)) and -1 for everything else (a Python int step: torch.optim.AdamW's single-tensor
    update, to the bit)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step_dim=-1))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, eps, wd, dim = group["betas"], group["lr"], group["eps"], group["weight_decay"], group["step_dim"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    shape = None if dim < 0 else (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
                    st["step"] = 0 if dim < 0 else torch.zeros(shape, dtype=torch.float32, device=p.device)
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v, g = st["exp_avg"], st["exp_avg_sq"], p.grad
                st["step"] += 1  # every row counts, frozen ones too
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)  # m <- b1·m + (1 − b1)·g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v <- b2·v + (1 − b2)·g²
                if dim < 0:  # p <- p − lr/(1 − b1^t) · m / (sqrt(v)/sqrt(1 − b2^t) + eps)
                    t = st["step"]
                    p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps), value=-lr / (1 - beta1 ** t))
                    continue
                t = st["step"].double()  # (r, 1) or (1, r): one bias correction per row or column
                step_size = (lr / (1 - beta1 ** t)).to(p.dtype)
                denom = (v.sqrt() / (1 - beta2 ** t).sqrt().to(p.dtype)).add_(eps)
                p.addcdiv_(m * -step_size, denom)
        return loss


def make_optimizer(model, cfg, train):
    """Groups: lora_A (per-row step), lora_B (per-column step), other matrices, vectors. Weight decay is
    train.py's rule, on 2-D tensors only (the official code decays every trainable tensor, norm gains too)."""
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
    A-rows slots_b: the counterparts, whose gradient statistics went stale (detail 6)."""
    if cfg.remain_switch_state:
        return  # as the official code: neither the moments nor the step are touched
    for p, slots, dim in ((layer.lora_B, slots_a, 1), (layer.lora_A, slots_b, 0)):
        st = opt.state.get(p)
        if not st or len(slots) == 0:
            continue  # no state before the first optimizer step: it starts at zero anyway
        idx = torch.as_tensor(slots, device=p.device)
        st["exp_avg"].index_fill_(dim, idx, 0.0)
        st["exp_avg_sq"].index_fill_(dim, idx, 0.0)
        if not cfg.remain_switch_step_state:
            st["step"].index_fill_(dim, idx, 0.0)


# ----------------------------------------------------------------------------- the switch, every update


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


def switch_layer(step, index, layer, opt, cfg, train):
    """One layer's event of update `step`, with both factor gradients present: switch k vectors per
    factor, zero the counterparts' Adam state, zero the gradients of frozen vectors."""
    rng = np.random.default_rng([train.seed, step, index])  # same draws on every rank, in any layer order
    expected = cfg.lora_rank / switch_interval(step, cfg, train)
    # stochastic rounding of r / interval(t): floor, +1 with probability of the fractional part
    k = min(int(expected) + int(rng.random() < expected % 1), layer.max_switch())
    if k > 0:
        slots_a, slots_b = layer.switch(k, cfg.adam_warm_step, rng if cfg.discontinuous_switch else None)
        zero_counterpart_state(layer, opt, slots_a, slots_b, cfg)
    layer.freeze_grads()


def before_step(step, model, opt, cfg, train):
    """METHOD: after backward, before clipping and opt.step(): every layer switches, then W absorbs it."""
    for i, (_, m) in enumerate(lora_layers(model)):
        if m.switchable:
            switch_layer(step, i, m, opt, cfg, train)
            m.fold()
    return {}


def param_step(step, p, model, opt, cfg, train):
    """METHOD (--per_layer_updates): p's gradient is complete and train.py is about to step the parameters
    that have a gradient. The first factor of a layer to arrive is held back (no gradient: not stepped);
    when the second arrives the layer switches with both, and both are stepped. W's compensation waits
    for after_step: the rest of the backward still needs this layer's W."""
    hit = [(i, m) for i, (_, m) in enumerate(lora_layers(model)) if p is m.lora_A or p is m.lora_B]
    if not hit or not hit[0][1].switchable:
        return
    i, m = hit[0]
    if m.held is None:
        m.held, p.grad = p.grad, None
        return
    other = m.lora_B if p is m.lora_A else m.lora_A
    other.grad, m.held = m.held, None
    switch_layer(step, i, m, opt, cfg, train)


def after_step(step, model, opt, cfg, train):
    """Fold what --per_layer_updates left pending into W; log the switch counts."""
    layers = [m for _, m in lora_layers(model) if m.switchable]
    for m in layers:
        m.fold()
    if not layers or not train.log_every or (step + 1) % train.log_every:
        return {}
    return {"switched": sum(m.n_switched for m in layers), "switch_interval": switch_interval(step, cfg, train)}


# ----------------------------------------------------------------------------- checkpoint and export

_BOOKKEEPING = ("selected_A", "selected_B", "frozen_A", "frozen_B")


def get_state(model, opt, cfg):
    """Pools, checked-out indices, freeze counters and pointers: everything that is not a Parameter."""
    return {name: {"candidates_A": m.candidates_A, "candidates_B": m.candidates_B,
                   **{k: torch.from_numpy(getattr(m, k).copy()) for k in _BOOKKEEPING},
                   "ptr_A": m.ptr_A, "ptr_B": m.ptr_B, "n_switched": m.n_switched}
            for name, m in lora_layers(model) if m.switchable}


def set_state(model, opt, cfg, state):
    for name, m in lora_layers(model):
        if m.switchable and name in state:
            s = state[name]
            m.candidates_A.copy_(s["candidates_A"])  # copy_ keeps each pool where it lives (host or device)
            m.candidates_B.copy_(s["candidates_B"])
            for k in _BOOKKEEPING:
                getattr(m, k)[:] = torch.as_tensor(s[k]).numpy()
            m.ptr_A, m.ptr_B, m.n_switched = int(s["ptr_A"]), int(s["ptr_B"]), int(s["n_switched"])


@torch.no_grad()
def export(model, cfg):
    """A plain GPT state dict on the CPU: W + s·B·A per adapted layer, merged on the device one layer at a
    time and moved to the CPU at once; the training model is left as it is."""
    layers = dict(lora_layers(model))
    sd = {}
    for key, v in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if name in layers and leaf in ("lora_A", "lora_B"):
            continue
        sd[key] = (layers[name].merged_weight() if name in layers and leaf == "weight" else v).to("cpu")
    return sd
