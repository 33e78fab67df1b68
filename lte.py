"""
LTE, LoRA-the-Explorer: pre-training from scratch with many LoRA heads trained in parallel.

Paper: "Training Neural Networks from Scratch with Parallel Low-Rank Adapters",
Minyoung Huh, Brian Cheung, Jeremy Bernstein, Phillip Isola, Pulkit Agrawal, 2024, arXiv 2402.16828.
Official code: github.com/minyoungg/LTE (lte/ddp/ddp_lte.py, lte/replica.py, lte/prepare.py).

The idea
--------
Every linear layer keeps a frozen main weight W (m×n) and N LoRA "heads" (A_h r×n, B_h m×r).
Each head plays the part of one worker: during training the batch is cut into N equal chunks
and chunk h goes through head h only,

    y_h = W x_h + s·(B_h A_h − B_h' A_h') x_h,        s = lora_alpha / r,

where (A_h', B_h') are head h's factors at the last merge (zero at first). Every T = merge_iter
updates the heads' progress since the last merge is averaged into the main weight,

    W ← W + (1/N) Σ_h s·(B_h A_h − B_h' A_h'),        then A_h' ← A_h, B_h' ← B_h,

and the heads carry on from where they are ("reset-less", what the official code does). Right
after a merge every head computes exactly W again. Evaluation uses W alone. A merge moves W to
the mean of the heads' effective weights, so it preserves that mean, not each head's function.

Modes (--mode; all of them also run on one device)
    ddp      the official default: under torchrun, torch DDP averages every head's gradient every
             update, so head h learns from chunk h of every rank (N virtual workers).
    local    the ranks are real workers: no DDP, each rank trains its own heads on its own data
             and the ranks communicate only at merges (an all-reduce of the mean update).
    mhlora   the official sanity check: no chunks, no merges, y = W x + Σ_h s·B_h A_h x.
--reset_lora re-draws the heads after every merge (the paper's main-text algorithm) instead.

Implementation details
----------------------
1. Head h of every linear (lm_head included, as the original converts every nn.Linear): A_h is
   semi-orthogonal (orthonormal rows) times √(n/r); B_h = 0; so the model is unchanged at init.
2. All N heads run in two batched products, (N, b·T, n) @ A^T @ B^T, with no loop over heads;
   the main-weight product W x is computed once for the whole batch. The reset-less correction
   rides along: [A_h; A_h'] and [B_h, −B_h'] are one rank-2r factor pair, so the difference is
   accumulated inside one product (under bf16 autocast too) rather than between two rounded ones.
3. The merge averages over heads with one (m × 2Nr)(2Nr × n) product in float32, never N full
   m×n matrices, adds W in float32 and writes the sum back once in W's dtype. A merge also runs
   after the last update, so model.pt holds every head's work.
4. Embeddings and RMSNorm gains (`--non_linear`): `replica` (default) keeps one copy per head,
   copy h trained on chunk h and all copies averaged (in float32) at each merge (the original's
   replica layers); `shared` keeps one copy trained on the whole batch and merged the same way;
   `frozen` leaves them at init. Evaluation uses the merged copy, like W.
5. `--mode mhlora`: every head sees the whole batch, a sum (N heads of rank r are one LoRA of
   rank N·r). Evaluation and model.pt use W + Σ_h s·B_h A_h.
6. `--reset_lora`: after each merge A_h ← a fresh semi-orthogonal draw (torch.Generator seeded
   with (seed, step), same on every rank), B_h ← 0, the prev factors stay 0, and the whole Adam
   state of A and B is zeroed, step included, so the first update after a reset is a first Adam
   step (size ≈ lr). Keeping the step would drop the bias correction: for a steady gradient the
   j-th update after a reset would be lr·(1 − β1^j)/√(1 − β2^j), 3.2x lr at j = 1, 6.6x at j = 12.
7. `--mode local`: at a merge the ranks all-reduce the mean head update (m×n per layer) and the
   replicas. Reset-less heads are also averaged over ranks then (local SGD on the factors) so
   that all ranks agree after a merge; with `--reset_lora` the fresh heads agree by construction
   and nothing else travels. Adam moments stay local; get_state gathers every rank's own
   tensors so a resume is exact.
8. Clipping is per head. train.py clips the norm of all gradients together, through which a large
   gradient on one chunk would shrink every other head's step: a coupling that separate workers
   do not have. before_step therefore clips each head's gradient (its factors in every layer
   and its replica copies; shared copies form one more group) to c/√G on its own, for G groups
   and c = --grad_clipping. The norm over all of them is then at most c, so train.py's clip
   changes nothing but for its guard (a common factor c/(c + 1e-6)); when all heads' norms are
   equal this is the global clip. train.py's grad_norm is the norm after this clip; the largest
   head norm before it is logged as method/head_grad_norm_max.
9. Precision. W, the merged replica copies and the replica copies themselves (N embeddings: the
   largest tensors) are stored in --storage_dtype, like every method's embeddings. The factors
   A_h, B_h (hence their gradients and Adam moments) and the prev factors are float32 always:
   a factor entry is about 1/√r and the paper's LR is 0.05-0.1x the usual one, so bf16 factors
   (8 significant bits) would drop every Adam step; and the prev factors must be exact copies
   of the factors, or every merge would add s·(B A − bf16(B) bf16(A)), a change no head made,
   with s = 128 in the paper. The official code also keeps float32 parameters under autocast
   (lte/misc/common.py). Merges are computed in float32 (detail 3).
10. `--per_layer_updates` works as is: each head tensor gets its gradient once per backward,
   and the merge runs in after_step. That mode runs without clipping, so param_step does nothing.
11. `comm_bytes_per_step` counts the payload all-reduced per update (float32 tensor sizes,
   averaged over a merge period) against full-rank DDP; merges log it as method/comm_MB.
12. export() builds each layer's weight on the device and moves it to the CPU at once.

Deviations from the official code
---------------------------------
- The original's 'dmp' mode (N physical copies of W) is left out: it computes the same thing
  as 'ddp' more slowly. The removed √α scaling for q/k projections is not used.
- Evaluation uses the merged copy of replicas, not replica 0 (they agree right after a merge;
  between merges this keeps evaluation identical on every rank in local mode).
- The final merge after the last update (detail 3); reset zeroes the prev factors and the LoRA
  Adam state (the original's reset helper leaves prev stale and has no optimizer); clipping per
  head (detail 8; the original has no training loop); no LoRA bias (LLaMA has none).
- --storage_dtype bfloat16 stores W and the replicas in bf16; the original keeps every parameter
  float32 (detail 9 says what stays float32 here).

Some warnings
-------------
- The batch (--batch_size, per device) must divide into num_heads chunks; each head learns from
  batch_size/num_heads sequences per update, so LTE needs more tokens than full-rank training.
- s is large (α=4096, r=32 gives 128) and the paper pairs it with 0.05-0.1× the usual LR; the
  product s·lr is what matters. Similar train losses can hide very different val losses.
- With --storage_dtype bfloat16 a merge's mean update below half a bf16 ulp of W (about 2^-9·|W|)
  is lost: merge less often rather than more. The N replica copies then train in bf16 too.
- `--mode ddp` communicates N·r·(m+n) gradient entries per layer per update: more than
  full-rank DDP whenever N·r > mn/(m+n). Only `--mode local` realises LTE's saving.
- Local mode under torchrun: ranks differ between merges, so use --check_ranks_every merge_iter
  (train.py skips its stop-time check on an interrupted run).

Memory. LTE adds memory by design: N heads of factors, N·r·(m+n) numbers per linear (at least
2mn once N·r >= max(m, n), the paper's heuristic), with their float32 Adam moments, the prev
factors, and N embedding copies (N·V·C) with theirs. Peak GiB of one update ending with a merge,
from `python memory.py --methods full,lte --model_config M --batch_size b [--storage_dtype
bfloat16] [--per_layer_updates --grad_clipping 0] --method_args "lte=--num_heads N --lora_r 64"`
(sequence 256, vocabulary 32000, bf16 autocast; "lean" adds --reset_lora --non_linear shared):
                                  float32 storage           bfloat16 storage
                                  full    lte    lte/full   full    lte    lte/full
    llama_1b  N 4,  batch 4       25.00   18.00  0.72x      12.53   11.19  0.89x
      per-layer updates           20.39   18.00  0.88x      10.05   11.19  1.11x
    llama_1b  N 32, batch 32      41.69   92.44  2.22x      28.05   72.05  2.57x
      lean                                58.45  1.40x              49.44  1.76x
    llama_7b  N 4,  batch 4      125.57   62.83  0.50x      62.82   33.78  0.54x
      per-layer updates           95.40   62.83  0.66x      43.93   33.78  0.77x
    llama_7b  N 32, batch 32     146.88  240.77  1.64x      86.86  182.37  2.10x
      lean                               166.05  1.13x             130.39  1.50x
At N 32 the heads dominate: llama_1b, float32, holds weights 27.6 GiB (W 5.0, factors 7.4, prev
7.4, embedding copies 7.8), Adam moments 30.4 (factors 14.8, copies 15.6) and activations 32.5
(full-rank 24.8; of the extra 7.7, 7.4 are the bf16 copies of [A_h; A_h'] and [B_h, −B_h'] that
autocast keeps for the backward). At N 4 LTE stays below full-rank because W has no gradient or moments.
LTE's peak comes at the start of the backward, before any gradient exists, so --per_layer_updates
does not lower it (its gradients are the small ones). The estimate matches a real CPU run to 0.0%
(memory.py --check, llama_9m, both storage dtypes).

Defaults: the paper's vs the ones here (for `tiny`: 4 layers, width 128, batch 16, lr 2e-3, the
best on tiny in the README's LR sweep, TRAIN_DEFAULTS; the numbers below were measured at lr 3e-3)
    paper/README: --num_heads 32 --lora_r 32 (main table 64) --lora_alpha 4096 --merge_iter 10, with
                  0.05-0.1x the usual LR; the library's LTEConfig: 1 head, r 8, alpha 16, merge every step
    here:         --num_heads 4 --lora_r 32 --lora_alpha 32 (s = 1) --merge_iter 10 at the usual LR
    Default run (500 updates, python bench.py --methods full,lte): val loss 1.422 vs full-rank 1.364.
    Sweep on tiny, 200 updates, val loss (full-rank 1.859); N 4, r 32, merge 10, replica unless said
    (measured with an earlier version: another init draw and a global clip; the trends, not the digits):
      alpha 8 / 16 / 32 / 64 / 128 / 256:      2.333 / 2.058 / 2.087 / 2.292 / 2.489 / 2.650
      alpha 32, merge_iter 1 / 5 / 10:         1.853 / 1.983 / 2.087   (merge 1 recovers full-rank)
      alpha 32, --reset_lora, merge 1 / 10:    2.241 / 2.112
      alpha 16, non_linear replica/shared/frozen: 2.058 / 2.107 / 2.200   (so: replica)
      alpha 16, 8 heads: 2.320;  mhlora (4 heads, alpha 16): 1.883
      torchrun, 2 ranks, defaults: full 1.543, ddp 1.715, local 1.928, local + reset 2.079
    Communication per update vs full-rank DDP (comm_bytes_per_step, merge 10): tiny N 4 r 32: ddp
    1.66x, local 0.25x, local + reset 0.10x; llama_60m N 32 r 64: ddp 6.5x, local 0.73x, local + reset 0.10x.

Usage
    python train.py --method lte                                     # tiny, 4 heads
    python train.py --method lte --mode mhlora                       # the sanity check
    python train.py --method lte --merge_iter 1                      # then raise merge_iter
    torchrun --nproc-per-node 2 train.py --method lte --mode local --reset_lora --check_ranks_every 10
    python memory.py --methods full,lte --model_config llama_1b --method_args "lte=--batch_size 4 --lora_r 64"
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import materialize


@dataclass
class Config:
    num_heads: int = field(default=4, metadata={"help": "N: LoRA heads per linear, one batch chunk each (paper 32)"})
    lora_r: int = field(default=32, metadata={"help": "r: rank of each head (paper 32-64)",
                                              "aliases": ["--lora_rank", "--rank"]})
    lora_alpha: float = field(default=32.0, metadata={"help": "alpha: head scaling s = alpha / r (paper 4096)"})
    merge_iter: int = field(default=10, metadata={"help": "T: merge the heads into W every T updates (paper 10)",
                                                  "aliases": ["--merge_steps"]})
    mode: str = field(default="ddp", metadata={
        "help": "ddp: heads on batch chunks, torch DDP under torchrun | local: ranks are separate workers "
                "that only communicate at merges | mhlora: every head sees the whole batch, summed, no merge",
        "choices": ["ddp", "local", "mhlora"]})
    reset_lora: bool = field(default=False, metadata={"help": "re-initialise the heads after each merge "
                                                                "(the paper's main-text variant)"})
    non_linear: str = field(default="replica", metadata={
        "help": "embeddings and norm gains: replica (one per head, averaged at merges) | shared | frozen",
        "choices": ["replica", "shared", "frozen"]})


TRAIN_DEFAULTS = {"lr": 2e-3}  # best on tiny in the README's LR sweep (1e-3 ... 8e-3, 1,000 updates, 2 seeds)
EVENT_EVERY_UPDATE = {"merge_iter": 1}  # memory.py: every update ends with a merge


def semi_orthogonal(num, rows, cols, generator):
    """`num` matrices (rows×cols, rows <= cols) with orthonormal rows, times √(cols/rows), float64 on the CPU."""
    g = torch.randn(num, cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # q: (num, cols, rows) with orthonormal columns
    q = q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)  # the Haar-distributed choice
    return q.mT * math.sqrt(cols / rows)


class LTELinear(nn.Module):
    """A frozen linear W plus N LoRA heads; in training, chunk h of the batch goes through head h."""

    def __init__(self, linear, cfg, generator):
        super().__init__()
        m, n, N, r = linear.out_features, linear.in_features, cfg.num_heads, cfg.lora_r
        W = linear.weight  # (m, n) in the storage dtype, on the layer's device
        dev, dt = W.device, torch.promote_types(W.dtype, torch.float32)  # factors: float32 even over bf16 W
        self.num_heads, self.mode, self.scaling = N, cfg.mode, cfg.lora_alpha / r  # s = α / r
        self.weight = nn.Parameter(W.data, requires_grad=False)  # W (m, n): the merged weight
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.lora_A = nn.Parameter(semi_orthogonal(N, r, n, generator).to(dev, dt))  # A_h: (N, r, n)
        self.lora_B = nn.Parameter(torch.zeros(N, m, r, device=dev, dtype=dt))  # B_h: (N, m, r), zero at init
        keep_prev = cfg.mode != "mhlora" and not cfg.reset_lora  # prev factors exist only when reset-less
        self.register_buffer("prev_A", torch.zeros(N, r, n, device=dev, dtype=dt) if keep_prev else None)  # A_h'
        self.register_buffer("prev_B", torch.zeros(N, m, r, device=dev, dtype=dt) if keep_prev else None)  # B_h'

    def factors(self):
        """(N, 2r, n), (N, m, 2r) with B_h·A_h = [B_h, −B_h']·[A_h; A_h'] = B_h A_h − B_h' A_h'."""
        if self.prev_A is None:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.prev_A], 1), torch.cat([self.lora_B, -self.prev_B], 2)

    def head_mean(self):
        """(1/N) Σ_h s·(B_h A_h − B_h' A_h') as one (m × N·2r)(N·2r × n) product, in the factors' float32."""
        A, B = self.factors()
        return (self.scaling / self.num_heads) * (B.transpose(0, 1).flatten(1) @ A.flatten(0, 1))

    def forward(self, x):  # x: (B, ..., n)
        y = F.linear(x, self.weight, self.bias)  # the main-weight product, shared by all heads
        if self.mode == "mhlora":  # METHOD: Σ_h s·B_h A_h x = s·[B_1 … B_N]·[A_1; …; A_N]·x
            u = F.linear(x, self.lora_A.flatten(0, 1))  # (B, ..., N·r)
            return y + self.scaling * F.linear(u, self.lora_B.transpose(0, 1).flatten(1))
        if not self.training:
            return y  # evaluation: merged weights only
        N = self.num_heads
        if x.shape[0] % N:
            raise ValueError(f"LTE needs a batch divisible by --num_heads {N}, got {x.shape[0]}")
        A, B = self.factors()
        xh = x.reshape(N, -1, x.shape[-1])  # (N, B/N·..., n): chunk h = rows h·B/N … (h+1)·B/N − 1
        d = torch.bmm(torch.bmm(xh, A.mT), B.mT)  # (N, B/N·..., m)
        return y + self.scaling * d.reshape(y.shape)


class Replicas(nn.Module):
    """Copies of a non-Linear module's weight (embedding, RMSNorm gain) that are averaged at merges.

    `weight` is the merged copy (evaluation and model.pt); `heads` (copies, *shape) train. With N
    copies chunk h goes through copy h; with one copy ('shared') the whole batch goes through it."""

    def __init__(self, module, copies):
        super().__init__()
        self.copies, self.template = copies, (module,)  # a tuple keeps `module` out of the module tree
        self.weight = nn.Parameter(module.weight.data, requires_grad=False)
        self.heads = nn.Parameter(module.weight.data.expand(copies, *module.weight.shape).clone())

    def call(self, w, x):  # the wrapped module's own forward with weight w
        return torch.func.functional_call(self.template[0], {"weight": w}, (x,))

    def forward(self, x):
        if not self.training:
            return self.call(self.weight, x)
        if self.copies == 1:
            return self.call(self.heads[0], x)
        if x.shape[0] % self.copies:
            raise ValueError(f"LTE needs a batch divisible by --num_heads {self.copies}, got {x.shape[0]}")
        return torch.vmap(self.call)(self.heads, x.unflatten(0, (self.copies, -1))).flatten(0, 1)


# ----------------------------------------------------------------------------- model surgery

HEAD_KEYS = ("lora_A", "lora_B", "prev_A", "prev_B", ".heads")  # state-dict keys that a plain GPT lacks


def local_world(cfg):
    """World size of local mode's own communication (1 when not distributed or not local)."""
    return dist.get_world_size() if cfg.mode == "local" and dist.is_initialized() else 1


def check_config(model, cfg, train):
    N = cfg.num_heads
    if N < 1 or cfg.lora_r < 1 or cfg.merge_iter < 1 or cfg.lora_alpha <= 0:
        raise ValueError("--num_heads, --lora_r, --merge_iter must be >= 1 and --lora_alpha > 0")
    if cfg.mode != "mhlora" and train.batch_size % N:
        raise ValueError(f"--batch_size {train.batch_size} (per device) must be divisible by --num_heads {N}: "
                         "each head trains on its own equal chunk of the batch")
    small = min(min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    if cfg.lora_r > small:
        raise ValueError(f"--lora_r {cfg.lora_r} exceeds the smallest linear dimension {small}")
    if getattr(model.config, "tie_embeddings", False):
        raise ValueError("LTE converts lm_head and the embedding separately: untie them (tie_embeddings False)")
    if cfg.mode == "local" and train.world_size > 1 and train.check_ranks_every % cfg.merge_iter:
        raise ValueError(f"in --mode local ranks differ between merges: use --check_ranks_every {cfg.merge_iter} "
                         f"(a multiple of --merge_iter), not {train.check_ranks_every}")


def wrap(model, cfg, train):
    """Every nn.Linear -> LTELinear; embeddings and norm gains -> Replicas (or frozen)."""
    check_config(model, cfg, train)
    gen = torch.Generator().manual_seed(train.seed)  # CPU draws in a fixed layer order: the same heads on every rank
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear):
                setattr(parent, name, LTELinear(materialize(model, full), cfg, gen))  # one layer at a time
            elif isinstance(getattr(child, "weight", None), nn.Parameter) and not list(child.children()):
                child = materialize(model, full)
                if cfg.non_linear == "frozen":
                    child.weight.requires_grad_(False)
                elif cfg.mode != "mhlora":  # mhlora has no merges: its embedding and norms train as usual
                    setattr(parent, name, Replicas(child, cfg.num_heads if cfg.non_linear == "replica" else 1))
    converted = {id(p) for m in model.modules() if isinstance(m, (LTELinear, Replicas))
                 for p in m.parameters() if p.requires_grad}
    if cfg.mode != "mhlora" and any(p.requires_grad and id(p) not in converted for p in model.parameters()):
        raise ValueError("LTE found a trainable parameter outside linears, embeddings and norms; freeze it first")


def use_ddp(cfg, train):
    return cfg.mode != "local"  # local mode communicates only at merges, by itself


def make_optimizer(model, cfg, train):
    """AdamW; weight decay on matrices, counting per head (a (N, C) norm replica is not a matrix)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            per_head = name.endswith(("lora_A", "lora_B", "heads"))
            (decay if p.dim() - per_head >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr,
                             betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)


# ----------------------------------------------------------------------------- clipping per head


def slice_norms(t):
    """(len(t),) Euclidean norm of each t[h], in at least float32."""
    n = torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))  # no full-size float32 copy of a bf16 t
    return n.to(torch.promote_types(n.dtype, torch.float32))


@torch.no_grad()
def before_step(step, model, opt, cfg, train):
    """METHOD: clip each head's gradient on its own to c/√G (detail 8), before train.py's global clip."""
    if train.grad_clipping <= 0 or cfg.mode == "mhlora":
        return {}
    per_head, shared = [], []  # tensors with one slice per head; tensors trained on the whole batch
    for mod in model.modules():
        if isinstance(mod, LTELinear):
            per_head += [mod.lora_A, mod.lora_B]
        elif isinstance(mod, Replicas):
            (per_head if mod.copies == cfg.num_heads else shared).append(mod.heads)
    norms = torch.stack([slice_norms(p.grad) for p in per_head]).pow(2).sum(0).sqrt()  # (N,)
    groups = [(per_head, norms)]
    if shared:  # one more group: its norm over all shared tensors, as a (1,) tensor
        groups.append((shared, torch.stack([slice_norms(p.grad) for p in shared]).pow(2).sum().sqrt().view(1)))
    limit = train.grad_clipping / math.sqrt(sum(len(n) for _, n in groups))  # c/√G: the total stays <= c
    for tensors, n in groups:
        coef = (limit / (n + 1e-6)).clamp(max=1.0)  # (N,) or (1,), as torch's clip_grad_norm_ computes it
        for p in tensors:
            p.grad.mul_(coef.to(p.grad.dtype).view(-1, *[1] * (p.dim() - 1)))
    return {"head_grad_norm_max": norms.max()} if train.log_every and (step + 1) % train.log_every == 0 else {}


def param_step(step, p, model, opt, cfg, train):
    """--per_layer_updates: nothing to do (that mode runs without clipping, before_step's only change)."""


# ----------------------------------------------------------------------------- the merge


def mean_over_ranks_(t, world):
    if world > 1:
        dist.all_reduce(t)  # SUM (gloo has no AVG)
        t /= world
    return t


@torch.no_grad()
def merge_heads(model, opt, cfg, train, step):
    """W ← W + mean over heads (and ranks) of s·(B_h A_h − B_h' A_h'); prev ← current; replicas averaged."""
    world, gen = local_world(cfg), torch.Generator().manual_seed(train.seed * 1_000_003 + step)
    upd, norm = [], []  # ‖ΔW‖², ‖W‖² per layer, for the log
    for mod in model.modules():
        if isinstance(mod, LTELinear):
            delta = mean_over_ranks_(mod.head_mean(), world)  # (m, n), float32
            upd.append(delta.pow(2).sum())
            delta += mod.weight  # W + ΔW in float32, rounded once to W's dtype
            mod.weight.copy_(delta)
            norm.append(delta.pow(2).sum())
            if cfg.reset_lora:  # A_h ← fresh draw, B_h ← 0 (prev stays 0); Adam state of A, B zeroed, step too
                N, r, n = mod.lora_A.shape
                mod.lora_A.copy_(semi_orthogonal(N, r, n, gen))  # same draw on every rank
                mod.lora_B.zero_()
                for p in (mod.lora_A, mod.lora_B):
                    for v in opt.state.get(p, {}).values():
                        v.zero_()  # exp_avg, exp_avg_sq and step: the next update is a first Adam step
            else:  # reset-less: heads carry on; in local mode they are averaged over ranks first
                mod.prev_A.copy_(mean_over_ranks_(mod.lora_A, world))
                mod.prev_B.copy_(mean_over_ranks_(mod.lora_B, world))
        elif isinstance(mod, Replicas):  # local-SGD averaging of the copies (over heads, then ranks), float32
            mean = mod.heads.mean(0, dtype=torch.promote_types(mod.heads.dtype, torch.float32))
            mod.weight.copy_(mean_over_ranks_(mean, world))
            mod.heads.copy_(mod.weight.expand_as(mod.heads))
    return {"merge_rel_update": (torch.stack(upd).sum() / torch.stack(norm).sum()).sqrt()}  # 0-dim tensor


def comm_bytes_per_step(model, cfg):
    """Float32 payload all-reduced per update, as {'lte': ..., 'full_ddp': ...} (bytes, per rank).

    full_ddp: every gradient of the plain model, every update. ddp/mhlora: every trainable tensor
    (N heads of factors, replicas), every update. local: at each merge, one m×n update per layer,
    the factors too when reset-less, and the replicas' merged copy; divided by merge_iter."""
    full = sum(t.numel() for k, t in model.state_dict().items() if not k.endswith(HEAD_KEYS))
    if cfg.mode != "local":
        lte = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        lte = 0
        for m in model.modules():
            if isinstance(m, LTELinear):
                lte += m.weight.numel() + (0 if cfg.reset_lora else m.lora_A.numel() + m.lora_B.numel())
            elif isinstance(m, Replicas):
                lte += m.weight.numel()
        lte /= cfg.merge_iter
    return {"lte": 4 * lte, "full_ddp": 4 * full}


def after_step(step, model, opt, cfg, train):
    """METHOD: merge every merge_iter updates (and after the last one)."""
    done = step + 1
    if cfg.mode == "mhlora" or (done % cfg.merge_iter and done != train.num_training_steps):
        return {}
    out = merge_heads(model, opt, cfg, train, step)
    comm = comm_bytes_per_step(model, cfg)
    return {**out, "comm_MB": comm["lte"] / 2**20, "full_ddp_comm_MB": comm["full_ddp"] / 2**20}


# ----------------------------------------------------------------------------- checkpoint and export


def get_state(model, opt, cfg):
    """Local mode under torchrun: every rank's own heads, replicas and Adam state (they differ)."""
    world = local_world(cfg)
    if world == 1:
        return {}
    per_rank = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            items = [("param", p.data)] + [(k, v) for k, v in opt.state.get(p, {}).items()
                                           if torch.is_tensor(v) and v.dim() > 0]
            for key, t in items:
                got = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(got, t.contiguous())
                per_rank[f"{name}/{key}"] = torch.stack(got).cpu()
    return {"per_rank": per_rank, "world": world}


@torch.no_grad()
def set_state(model, opt, cfg, state):
    if "per_rank" not in state:
        return
    if state["world"] != local_world(cfg):
        raise ValueError(f"this local-mode checkpoint was made on {state['world']} ranks; resume on as many")
    rank = dist.get_rank()
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(state["per_rank"][f"{name}/param"][rank])
            for k, v in opt.state.get(p, {}).items():
                if f"{name}/{k}" in state["per_rank"]:
                    v.copy_(state["per_rank"][f"{name}/{k}"][rank])


@torch.no_grad()
def export(model, cfg):
    """Plain GPT state dict on the CPU of the evaluation function: merged W (plus Σ_h s·B_h A_h in
    mhlora, built on the device one layer at a time and moved at once)."""
    summed = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LTELinear) and cfg.mode == "mhlora"}
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith(HEAD_KEYS):
            continue
        if name in summed:
            m = summed[name]
            t = (m.head_mean().mul_(m.num_heads) + m.weight).to(m.weight.dtype)  # W + Σ_h s·B_h A_h
        sd[name] = t.detach().cpu()
    return sd
