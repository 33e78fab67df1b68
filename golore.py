"""
GoLore: GaLore's gradient subspaces from the SVD early in training, random subspaces late.

    "Subspace Optimization for Large Language Models with Convergence Guarantees",
    Yutong He, Pengrui Li, Yipeng Hu, Chuyan Chen, Kun Yuan (2024; ICML 2025), arXiv:2410.11289.
    Built on GaLore: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Jiawei Zhao et al. (2024), arXiv:2403.03507. Official code: github.com/pkumelon/Golore
    (peft_pretraining/GoLore.py, the README's "ReLoRA-like" path) and github.com/jiaweizzhao/GaLore
    (galore_torch/).

The idea. GaLore keeps Adam's state in an r-dimensional subspace of each weight's gradient: every T
steps it takes the top-r singular vectors of the current gradient G as a projector P, runs Adam on
the projected gradient G·Pᵀ (m×r) and applies the update back-projected, ΔW = -lr·s·Adam(G·Pᵀ)·P.
GoLore's observation: G is a *stochastic* gradient. Late in training the true gradient is small and
the minibatch noise dominates G, so the SVD picks a noise subspace in which the expected gradient is
zero, and GaLore stalls (the paper's counterexample; `projected_adam_demo` below reproduces it).
GoLore draws P uniformly from the Stiefel manifold instead, which keeps E[PᵀP] = (r/n)·I and
provably converges. The recipe: SVD for the first `rand_ratio` of training, random after that.

The low-rank form used here (GoLore's "ReLoRA-like" path). Each adapted linear y = W x keeps W (m×n)
frozen, a frozen projector P on its smaller side and a trainable factor R on its larger side,
initialised to zero:

    m >= n ("right"):  P (r×n, orthonormal rows),    R (m×r),  W_eff = W - s·R·P
    m <  n ("left"):   P (m×r, orthonormal columns), R (r×n),  W_eff = W - s·P·R

    dL/dR = -s·G·Pᵀ (right) or -s·Pᵀ·G (left), with G = dL/dW_eff

Adam's step does not change when its gradients are scaled by a constant c > 0 and flips with -1
(eps aside: it becomes eps/s), so one Adam step on R moves W_eff by -lr·s·Adam(G·Pᵀ)·P: exactly a
GaLore step with scale s (tests/test_golore.py checks this against an independent GaLore AdamW).
The minus sign is the original's; it cancels through the chain rule. Every T steps (the projection
step):

    W <- W - s·R·P                           merge: W_eff is unchanged
    P <- top-r singular vectors of G         (SVD, step/num_steps < rand_ratio)
      or Haar-random orthonormal matrix      (QR of a Gaussian, afterwards)
    m <- m·(P_old·P_newᵀ)  (left: (P_newᵀ·P_old)·m)   GoLore only: Adam's first moment, re-projected
    R <- 0,  R.grad <- -s·G·P_newᵀ           the full gradient is not wasted: this step also updates

GaLore or GoLore: the moment rule. galore_torch never touches Adam's moments when its projector
changes (m and v stay in the old coordinates, the step count runs on); GoLore's ReLoRA-like code
re-projects the first moment at every change, SVD or random. The rule follows the run, not the
projector: `--rand_ratio >= 1` (never random) is GaLore and leaves both moments alone; a GoLore run
(`--rand_ratio < 1`) re-projects the first moment at every projection, in its SVD phase too. The
second moment and the step count are always kept.

Modes.
- `--per_layer_updates` (the originals' per-layer optimizers): train.py steps each parameter inside
  its gradient hook. A layer's projection (merge, new P, moment, injected gradient, R's step) then
  runs in the hook of W or R, whichever completes last (`param_step`), and W.grad is freed at once,
  so one layer's full gradient exists at a time instead of all of them.
- `--storage_dtype bfloat16`: W, P, R and the rest are stored in bf16, as in the originals' pure-bf16
  runs (GoLore's layer is cast with the model; galore_torch keeps P and Adam's state in the
  gradient's bf16); AdamW's state follows R. R is not small, r·max(m, n) per layer (a quarter of
  the model at r = h/4), so `--factor_dtype float32` is an option, not the default: it adds 8 bytes
  per entry of R (float32 R, its two moments, and the bf16 copy autocast keeps for the backward),
  llama_7b per-layer 26.4 -> 38.5 GiB (full-rank: 39.6). What bf16 R costs in precision: R sums up
  to T AdamW steps from zero, and that sum in bf16 is off by 0.9% / 2.9% / 12.5% (T = 50 / 200 /
  500; notebooks/03_golore, section 4), about what pure-bf16 GaLore makes of the same steps added
  to a bf16 W (1.1% / 2.7% / 14.5%); on tiny, val loss 1.5229, and 1.5174 with float32 R (`python
  train.py --method golore --storage_dtype bfloat16 --num_training_steps 300 [--factor_dtype
  float32]`). Merges, re-projections and injected gradients are computed in float32 and written
  back in bf16, so W is rounded once per projection (pure-bf16 GaLore rounds it at every step).
- `--optimizer adam8bit`: GaLore's "8-bit GaLore" (Zhao et al. 2024 combine the projection with
  8-bit Adam and per-layer weight updates, which is how their 7B pre-training fits a 24 GB GPU).
  The state that GaLore makes small, R's two Adam moments (r·max(m, n) entries each), is stored
  in 8 bits with block-wise quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"). Each block of 256 entries keeps one float32 absmax, and each entry keeps one
  byte: the index of the level of a 255-level dynamic code nearest to x / absmax. The code's
  levels are spaced like a float with a variable-length exponent: 64 linear steps in
  (0.1, 1], 32 in (0.01, 0.1], and so on, so small entries keep their relative precision. m goes
  on the signed code. For v the unsigned code (no zero, 128 steps in the top decade) holds √v,
  not v. This halves v's dynamic range, and a v that rounds to 0 under a non-zero m can no
  longer blow up the step. Total cost: 2 + 8/256 bytes per entry instead of 8 (float32) or
  4 (bf16). A step decodes 4M entries at a time to float32, applies Adam to them with this
  step's gradient, writes the codes back in place and moves R using the float32 moments. So each
  moment is rounded once per step, and the float32 temporaries stay small however big the tensor
  is (AdamW8bit). At a projection nothing new happens: GaLore leaves the codes as they are. GoLore
  decodes m, applies the same r×r product as above and encodes it again (√v and the step stay).
  The embeddings, lm_head and norms keep torch's AdamW, with the same state and the same update
  as --optimizer adamw. `--adam8bit_embeddings` puts the embeddings and lm_head in 8 bits too,
  like the original, whose per-layer 8-bit runs give every non-GaLore tensor bitsandbytes'
  Adam8bit. Checkpoints hold plain tensors, and a resume restores every code as uint8 (torch's
  loader would cast the codes to R's dtype).

Implementation details
1. Which layers: every q/k/v/o and gate/up/down projection (`model.adapted_linear_names`); the
   embedding, the norms and lm_head stay full-rank and train with plain AdamW, as in the original.
2. Side: GaLore's "std" rule, right projection if m >= n, else left; P is a persistent buffer
   (checkpointed with the model), R a Parameter; both start at zero.
3. The full gradient. Projection steps are the updates with step % update_proj_gap == 0, counting
   from 0 (the original's `update_step % update_proj_gap == 0`), so update 0 chooses the first P.
   `step_start` switches requires_grad on for every W of those steps, so autograd accumulates
   G = dL/dW_eff over the micro-batches of that update with no extra batch; the event takes it and
   switches W off again. R stays in the graph on every step, so DDP (whose parameter set is fixed
   when it is built) sees a gradient for all its parameters; on a projection step that autograd
   gradient is replaced by the injected one.
4. DDP: DDP reduces only its own parameters, so `before_step` all-reduces each G itself (sum, then
   divide by the world size) before the SVD: every rank computes the same P. A random P comes from
   a torch.Generator seeded with (seed, step, layer index), drawn on the CPU: the same on every rank
   and in both update modes, whatever order the layers are projected in.
5. SVD in float32 (float64 stays float64), `full_matrices=False`; if it fails (GaLore#58) it is
   retried in float64 on the CPU. Random P: Q of the QR of an (n×r or m×r) Gaussian, with Q's
   columns multiplied by the signs of the QR's diagonal; this makes Q Haar-distributed.
6. Adam: `make_optimizer` builds train.py's default AdamW, group for group (adamw), or AdamW8bit
   (adam8bit: R in an 8-bit group, the rest in torch's AdamW; SGD's momentum_buffer would be
   re-projected like exp_avg). The 8-bit step reads no tensor on the host (the step count stays a
   tensor, its bias corrections are computed in float64), so memory.py runs it on fake tensors.
7. Weight decay decays all of W_eff, as galore_torch decays the full weight inside its optimizer:
   train.py's AdamW decays R (a 2-D trainable tensor) by (1 - lr·wd) and `after_step` multiplies W
   by the same factor. (GoLore's ReLoRA-like code decays only its trainable factor, i.e. only the
   part of W_eff learnt since the last projection: not a decay of the weights.) In bf16 storage
   1 - lr·wd rounds to 1 on most entries, as it does in galore_torch's pure-bf16 runs.
8. export() returns W_eff = W - s·R·P (or W - s·P·R) under the plain GPT names, on the CPU, each
   computed on the device in float32 and moved at once: model.pt is an ordinary model.py checkpoint.

Deviations from the official code, and why
- The random P comes from QR with the sign fix, not from the polar factor Z(ZᵀZ)^(-1/2) computed
  through an n×n SVD of a rank-r Gram matrix (wasteful, and it relies on a pseudo-inverse of a
  singular matrix), and from a seeded generator instead of the global RNG (so ranks agree without
  relying on lockstep RNG).
- The original clips first and then merges, so its clip norm on a projection step counts the full
  G; here train.py clips after `before_step`, so that norm counts the projected gradient s·G·Pᵀ.
  Between projection steps the two are identical.
- The original turns R's gradient off on projection steps; here R stays in the graph (detail 3).
- W never enters the optimizer (the original lists it, with grad None); merges run in at least
  float32 (the original merges into bf16 weights). AdamW is torch's (eps inside the bias
  correction, decay before the update), not the HF-style one; pass --adamw_eps 1e-6 for the
  original's epsilon.
- float16 with a GradScaler is refused: G is not part of the optimizer, so the scaler would not
  unscale it. Use bfloat16 or float32.
- adam8bit is written here, not bitsandbytes (galore_torch's GaLoreAdamW8bit calls bitsandbytes'
  8-bit blockwise update). It keeps √v instead of v, and it always keeps the norms in torch's
  AdamW (bitsandbytes quantizes every tensor of 4096 entries or more). It also keeps the
  embeddings and lm_head there unless you pass --adam8bit_embeddings. The update is torch AdamW's
  formula computed from the decoded moments.

Some warnings
- A projection step is a memory spike: without --per_layer_updates one full m×n gradient per
  adapted layer exists at once after the backward; then, layer by layer, the float32 merge and SVD.
- The first update (step 0) uses a projector chosen from one minibatch at random initialisation.
- rand_ratio counts against --num_training_steps: change the length and the switch point moves.
- On GPUs the SVD and the all-reduce are assumed deterministic, so that ranks agree bit for bit;
  `--check_ranks_every` verifies it.

Logged on projection steps: method/proj_random (0: SVD, 1: random) and method/proj_kept, the mean
share of ‖G‖² that the new subspaces keep (top-r energy for the SVD, about r/n for random P).

Memory: the peak of the costliest update (a projection with the SVD) from memory.py, in GiB;
micro-batch 1 x 256, vocabulary 32000, bf16 compute, r 512 (llama_1b) and 1024 (llama_7b):

                        float32 storage        bfloat16 storage
                        plain   per-layer      plain   per-layer
    llama_1b  full      24.96   18.37          12.49    8.28
    llama_1b  golore    16.16   14.33           8.16    5.83
    llama_7b  full     125.53   90.11          62.77   39.59
    llama_7b  golore    79.94   68.31          40.26   26.44
    llama_7b  golore, --optimizer adam8bit     37.25   23.43   (float32 storage not measured)

    python memory.py --methods full,golore --model_config llama_1b --method_args "golore=--rank 512" \
        [--storage_dtype bfloat16] [--per_layer_updates --grad_clipping 0]

Without per-layer updates the peak is in before_step: every W's G is alive while the first layers
merge and take their SVD; with them it is in the backward, one G at a time.
GaLore's paper fits 7B in 24 GB with 8-bit Adam and per-layer updates. Here llama_7b in bf16 with
per-layer updates and AdamW peaks at 26.40 GiB. The parts are W 12.0 GiB, P 1.75, R 3.0 (the
low-rank form's own tensor; GaLore adds its update to W directly), the AdamW state in bf16 7.0
(6.0 of it R's), and activations and transients for the rest. With --optimizer adam8bit the
peak is 23.43 GiB: R's moments take 3.05 GiB instead of 6.0. Adding --adam8bit_embeddings gives
22.95 GiB: the embeddings' and lm_head's state shrinks from 0.98 to 0.50. The weights, 17.3 GiB,
are now the bulk.

    python memory.py --methods golore --model_config llama_7b --storage_dtype bfloat16 --per_layer_updates \
        --grad_clipping 0 --method_args "golore=--rank 1024 --rand_ratio 2 --optimizer adam8bit [--adam8bit_embeddings]"

`--check` runs the same two updates for real on the CPU and measures them with the allocator. It
agrees with the estimate to 0.0% on tiny and llama_9m in all four modes, and on llama_60m (r 128)
in float32 and in bf16 per-layer. With adam8bit it agrees to -0.1% on llama_130m (1,460.8 MiB
estimated, 1,462.9 measured), and to 0.0% on llama_9m with --adam8bit_embeddings, both plain in
float32 and per-layer in bf16.

Usage
    python train.py --method golore                       # tiny defaults: r 32, T 50, rand_ratio 0.8
    python train.py --method golore --rand_ratio 2        # GaLore (never random, moments untouched)
    python train.py --method golore --storage_dtype bfloat16 --per_layer_updates --grad_clipping 0
    python train.py --method golore --optimizer adam8bit  # R's Adam moments in 8 bits
    python train.py --method golore --model_config llama_7b --storage_dtype bfloat16 --rank 1024 --rand_ratio 2 \
        --optimizer adam8bit --per_layer_updates --grad_clipping 0 --batch_size 1 --max_length 256  # 23.4 GiB
    torchrun --nproc-per-node 2 train.py --method golore --model_config llama_60m --rank 128 \
        --update_proj_gap 200 --lr 1e-3 --adamw_eps 1e-6  # the README's 60M recipe, shorter

Defaults. Paper/README (LLaMA-60M, 10K steps): rank 128 (r/h = 1/4), scale 1.0, update_proj_gap 200
(50 projections), rand_ratio 0.8, lr 1e-3. Here, for `tiny` (h = 128, 500 steps): rank 32 keeps
r/h = 1/4 and update_proj_gap 50 gives 10 projections (the README gap would give 3); scale and
rand_ratio as in the README; lr 2e-3, the best on tiny in the README's LR sweep (TRAIN_DEFAULTS).
"""

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import adapted_linear_names, materialize


@dataclass
class Config:
    # (the field is `r`, not `rank`: train.py's TrainConfig.rank is the process rank; --rank still works)
    r: int = field(default=32, metadata={"help": "r, the subspace rank (README: 128 for llama_60m)",
                                         "aliases": ["--rank", "--lora_r", "--lora_rank"]})
    scale: float = field(default=1.0, metadata={"help": "s in W_eff = W - s·R·P; multiplies the subspace LR"})
    update_proj_gap: int = field(default=50, metadata={"help": "T, a new projector every T updates (README: 200)"})
    rand_ratio: float = field(default=0.8, metadata={"help": "random projectors once step/num_training_steps >= "
                                                             "this; >= 1 is GaLore"})
    factor_dtype: str = field(default="storage", metadata={
        "help": "dtype of R and its AdamW state: storage (--storage_dtype's), or float32 (under bfloat16 "
                "storage: more precise, 8 more bytes per entry of R)", "choices": ["storage", "float32"]})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (torch's; its state in R's dtype) | adam8bit (R's projected moments as 8-bit block codes)",
        "choices": ["adamw", "adam8bit"]})
    adam8bit_embeddings: bool = field(default=False, metadata={
        "help": "adam8bit: 8-bit moments for the embeddings and lm_head too (default: torch's AdamW state)"})


# memory.py: a projection (the SVD, the costly kind with the default rand_ratio) at every update
TRAIN_DEFAULTS = {"lr": 2e-3}  # best on tiny in the README's LR sweep (1e-3 ... 8e-3, 1,000 updates, 2 seeds)
EVENT_EVERY_UPDATE = {"update_proj_gap": 1}


def at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def svd_projector(G, r, right):
    """GaLore's P: top-r right singular vectors (r×n) if right, else left ones (m×r); views into the SVD."""
    try:
        U, S, Vh = torch.linalg.svd(at_least_fp32(G), full_matrices=False)
    except torch.linalg.LinAlgError:  # "failed to converge" (GaLore#58): retry with LAPACK in float64
        U, S, Vh = (t.to(G.device) for t in torch.linalg.svd(G.detach().double().cpu(), full_matrices=False))
    return Vh[:r] if right else U[:, :r]


def random_projector(m, n, r, right, generator, device="cpu"):
    """GoLore's P: uniform on the Stiefel manifold (Haar), of svd_projector's shape; float64, on the
    GPU if `device` is one (the QR is the cost there), else on the CPU."""
    Z = torch.randn(n if right else m, r, generator=generator, dtype=torch.float64)  # CPU: same on every rank
    Q, upper = torch.linalg.qr(Z.to(device if torch.device(device).type == "cuda" else "cpu"))  # Q (d, r)
    Q = Q * torch.where(torch.diagonal(upper) < 0, -1.0, 1.0)  # sign fix: without it Q is not Haar-uniform
    return Q.T if right else Q


class GoLoreLinear(nn.Module):
    """y = x W_effᵀ (+ b), W_eff = W - s·R·P (right, m >= n) or W - s·P·R (left); only R trains."""

    def __init__(self, base: nn.Linear, r, scale, factor_dtype="storage"):
        super().__init__()
        m, n = base.weight.shape
        self.r, self.scale, self.right = r, scale, m >= n
        self.weight = base.weight  # W (m, n): frozen, in the storage dtype; changed only by merges
        self.weight.requires_grad_(False)
        self.bias = base.bias
        device, dtype = base.weight.device, base.weight.dtype
        # P: (r, n) if right else (m, r), in W's dtype; zero until the projection at step 0
        self.register_buffer("proj", torch.zeros((r, n) if self.right else (m, r), device=device, dtype=dtype))
        # R: (m, r) if right else (r, n), in W's dtype or at least float32; zero, so W_eff = W at wrap
        R_dtype = torch.promote_types(dtype, torch.float32) if factor_dtype == "float32" else dtype
        self.factor = nn.Parameter(torch.zeros((m, r) if self.right else (r, n), device=device, dtype=R_dtype))
        self.full_grad, self.factor_done, self.kept = None, False, None  # one projection step's bookkeeping

    def extra_repr(self):
        m, n = self.weight.shape
        return f"out={m}, in={n}, r={self.r}, side={'right' if self.right else 'left'}, scale={self.scale}"

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # x Wᵀ; W gets a gradient only on projection steps
        if self.right:  # x Pᵀ Rᵀ: (.., n) -> (.., r) -> (.., m)
            h = F.linear(x, self.proj)
            low = F.linear(h, self.factor.to(h.dtype))
        else:  # x Rᵀ Pᵀ: (.., n) -> (.., r) -> (.., m)
            low = F.linear(F.linear(x, self.factor.to(x.dtype)), self.proj)
        return y - self.scale * low

    def factor_grad(self, G):
        """dL/dR for the full gradient G = dL/dW_eff: -s·G·Pᵀ (m, r) or -s·Pᵀ·G (r, n), in R's dtype."""
        G, P = at_least_fp32(G), at_least_fp32(self.proj)
        return (-self.scale * (G @ P.T if self.right else P.T @ G)).to(self.factor.dtype)

    @torch.no_grad()
    def merged_weight(self):
        """W_eff = W - s·R·P (or W - s·P·R): a new (m, n) tensor in at least float32; W is untouched."""
        R, P = at_least_fp32(self.factor), at_least_fp32(self.proj)
        W = self.weight.to(R.dtype, copy=True)
        return W.addmm_(*((R, P) if self.right else (P, R)), alpha=-self.scale)

    @torch.no_grad()
    def merge_and_reinit(self, G, optimizer=None, generator=None, reproject=True):
        """The projection event, given the (all-reduced) full gradient G (m, n).

        generator None: P from the SVD of G (GaLore); else a random P drawn from it (GoLore).
        reproject: carry Adam's first moment into the new subspace (GoLore) or leave it (GaLore).
        Returns ‖G·P_newᵀ‖² / ‖G‖² (a 0-dim tensor), the share of G's energy the new subspace keeps."""
        # W <- W - s·R·P, computed in at least float32: the function is unchanged once R is zeroed below
        self.weight.copy_(self.merged_weight())
        m, n = self.weight.shape
        G, P_old = at_least_fp32(G), at_least_fp32(self.proj)  # (m, n), and (r, n) or (m, r)
        P_new = (svd_projector(G, self.r, self.right) if generator is None
                 else random_projector(m, n, self.r, self.right, generator, G.device))
        # a new tensor, not copy_: under --per_layer_updates the backward may still need the old P; and
        # a copy holds no view of the SVD's U or Vh
        self.proj = torch.empty_like(self.proj).copy_(P_new)
        P = at_least_fp32(self.proj)  # the P the forward will use (rounded to the storage dtype)
        state = optimizer.state.get(self.factor, {}) if optimizer is not None and reproject else {}
        for key in ("exp_avg", "momentum_buffer"):  # exp_avg_sq and the step count are kept
            if torch.is_tensor(state.get(key)):
                M = state[key]  # (m, r) or (r, n): lifted with P_old, projected with P, through an r×r product
                M32 = at_least_fp32(M)
                M.copy_(M32 @ (P_old @ P.T) if self.right else (P.T @ P_old) @ M32)
        if "m_codes" in state:  # --optimizer adam8bit: the same product on the decoded first moment, re-encoded
            M32 = decode(state, "m").view(self.factor.shape).to(P.dtype)
            encode_(state, "m", M32 @ (P_old @ P.T) if self.right else (P.T @ P_old) @ M32)
        self.factor.zero_()
        self.factor.grad = self.factor_grad(G)  # R.grad <- -s·G·Pᵀ: the optimizer still steps on this update
        return self.factor.grad.pow(2).sum() / (self.scale ** 2 * G.pow(2).sum()).clamp_min(1e-30)


# ----------------------------------------------------------------------------- model surgery


def golore_layers(model):
    return [m for m in model.modules() if isinstance(m, GoLoreLinear)]


def wrap(model, cfg, train=None):
    """Replace every attn/mlp nn.Linear by a GoLoreLinear (in place). The rest stays trainable."""
    if cfg.r < 1 or cfg.update_proj_gap < 1 or cfg.rand_ratio < 0 or cfg.scale == 0:
        raise ValueError("golore needs --rank >= 1, --update_proj_gap >= 1, --rand_ratio >= 0 and a nonzero --scale")
    if cfg.adam8bit_embeddings and cfg.optimizer != "adam8bit":
        raise ValueError("--adam8bit_embeddings needs --optimizer adam8bit")
    if train is not None and train.dtype == "float16":
        raise ValueError("golore does not support --dtype float16 (the GradScaler would not unscale the full "
                         "gradient G); use bfloat16 or float32")
    for name in adapted_linear_names(model):
        parent, _, child = name.rpartition(".")
        base = materialize(model, name)  # real weights for this layer only (the GPT may be a meta skeleton)
        if cfg.r > min(base.weight.shape):
            raise ValueError(f"--rank {cfg.r} exceeds min(out, in) = {min(base.weight.shape)} of {name}")
        setattr(model.get_submodule(parent), child, GoLoreLinear(base, cfg.r, cfg.scale, cfg.factor_dtype))
    return model


# ----------------------------------------------------------------------------- the optimizer: AdamW, or 8-bit AdamW
# same block-wise 8-bit scheme as loqt.py (intended duplication: each method file is self-contained)


def dynamic_levels(signed, zero=True):
    """8-bit dynamic code: decade i (values in (10^-i-1, 10^-i]) gets 2^(bits-1-i) linear steps, so
    precision is relative, like a float with a variable-length exponent (Dettmers et al. 2022).
    signed: 127 magnitudes, their negatives and 0; unsigned without zero: 255 magnitudes."""
    bits = 7 if signed else 8
    mags = [10.0 ** -i * (0.1 + 0.9 * j / 2 ** (bits - 1 - i)) for i in range(bits) for j in range(1, 2 ** (bits - 1 - i) + 1)]
    return sorted(([-x for x in mags] if signed else []) + ([0.0] if zero else []) + mags)


# plain Python numbers, turned into tensors where they are used: no tensor outlives a fake-tensor run
LEVELS = {"dyn": dynamic_levels(True), "dyn+": dynamic_levels(False, zero=False)}  # m; and √v (no zero point)
MIDPOINTS = {kind: [(a + b) / 2 for a, b in zip(v, v[1:])] for kind, v in LEVELS.items()}  # rounding boundaries
BLOCK = 256  # entries per float32 absmax: 1/64 byte of scale per entry
CHUNK = 2 ** 22  # entries an 8-bit step decodes at a time (a multiple of BLOCK): 16 MiB per float32 temporary


def quantize_blockwise(x, kind, block=BLOCK):
    """x -> (codes uint8 (numel padded to the block), absmax float32 (blocks,)): the nearest level of x / absmax."""
    pad, flat = -x.numel() % block, x.float().reshape(-1)
    flat = (F.pad(flat, (0, pad)) if pad else flat).view(-1, block)  # (blocks, block)
    absmax = flat.abs().amax(1)
    mids = torch.tensor(MIDPOINTS[kind], device=x.device)
    idx = torch.bucketize(flat / absmax.clamp_min(1e-30)[:, None], mids, out_int32=True)  # nearest level
    return idx.to(torch.uint8).flatten(), absmax


def dequantize_blockwise(codes, absmax, kind, numel):
    """levels·absmax, float32 (numel,); temporaries: int32 indices and the result, of the padded size."""
    table = torch.tensor(LEVELS[kind], device=codes.device)
    out = table.index_select(0, codes.int()).view(absmax.numel(), -1).mul_(absmax.unsqueeze(1))  # (blocks, block)
    return out.view(-1) if out.numel() == numel else out.view(-1)[:numel]


KIND = {"m": "dyn", "v": "dyn+"}  # an 8-bit state keeps m and √v: "m_codes"/"m_absmax", "v_codes"/"v_absmax"


def decode(st, key, lo=0, hi=None):
    """Entries lo:hi (whole blocks from lo) of m (key "m") or √v (key "v") of an 8-bit state, in float32."""
    hi = st["numel"] if hi is None else hi
    blocks = slice(lo // BLOCK, -(-hi // BLOCK))
    codes, absmax = st[key + "_codes"][lo:blocks.stop * BLOCK], st[key + "_absmax"][blocks]
    return dequantize_blockwise(codes, absmax, KIND[key], hi - lo)


def encode_(st, key, x, lo=0):
    """Store x (entries lo:lo + x.numel(), lo at a block boundary) into the state's own code and absmax tensors."""
    blocks = slice(lo // BLOCK, -(-(lo + x.numel()) // BLOCK))
    codes, absmax = quantize_blockwise(x, KIND[key])
    st[key + "_codes"][lo:blocks.stop * BLOCK].copy_(codes)
    st[key + "_absmax"][blocks].copy_(absmax)


class AdamW8bit(torch.optim.AdamW):
    """torch's AdamW, except in the param groups with bits=8: there Adam's two moments are 8-bit codes.

    Groups with bits=32 are stepped by torch's AdamW itself (the same update and state as
    --optimizer adamw). A bits=8 parameter's state is step (float32, 0-dim), numel, m_codes/m_absmax
    (m on the signed code) and v_codes/v_absmax (√v on the unsigned code without zero), blocks of
    256 with a float32 absmax each. Its step decodes m and v to float32 CHUNK entries at a time,
    updates them with this step's gradient, encodes them again in place and applies the update
    computed from the float32 m and v: the moments are rounded once per step, and the float32
    temporaries never exceed a few chunks, however large the tensor (the embeddings at 7B: 131M
    entries). Everything stays a tensor (no .item()): the step runs on fake tensors. A parameter
    without a gradient is skipped (--per_layer_updates steps one at a time)."""

    @torch.no_grad()
    def step(self, closure=None):  # (no closure: train.py never passes one)
        done = []
        for g in self.param_groups:
            for p in g["params"] if g.get("bits") == 8 else []:
                if p.grad is not None:
                    self.step_8bit(p, g)
                    done.append((p, p.grad))
                    p.grad = None  # hidden from torch's step below, given back after it
        try:
            super().step()  # the bits=32 groups
        finally:
            for p, grad in done:
                p.grad = grad

    def step_8bit(self, p, g):
        (b1, b2), lr, st = g["betas"], g["lr"], self.state[p]
        if not st:  # m = v = 0: the codes that quantizing zeros gives (absmax 0 decodes every code to 0)
            n = -(-p.numel() // BLOCK)
            st["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU, as torch's AdamW keeps it
            st["numel"] = p.numel()
            st["m_codes"] = torch.full((n * BLOCK,), LEVELS["dyn"].index(0.0), dtype=torch.uint8, device=p.device)
            st["v_codes"] = torch.zeros(n * BLOCK, dtype=torch.uint8, device=p.device)
            st["m_absmax"], st["v_absmax"] = torch.zeros(n, device=p.device), torch.zeros(n, device=p.device)
        st["step"] += 1
        t = st["step"].double()  # a tensor (no host sync, fake-tensor safe); float64: 1 − β2^t cancels in float32
        scale, root_bc2 = lr / (1 - b1 ** t), (1 - b2 ** t).sqrt()  # lr / (1 − β1^t), √(1 − β2^t)
        p.mul_(1 - lr * g["weight_decay"])  # decoupled decay first, as torch's AdamW
        flat, grad = p.view(-1), p.grad.reshape(-1)
        for lo in range(0, st["numel"], CHUNK):  # whole blocks at a time
            hi = min(lo + CHUNK, st["numel"])
            m, v = decode(st, "m", lo, hi), decode(st, "v", lo, hi).square_()
            gc = grad[lo:hi]
            m.mul_(b1).add_(gc, alpha=1 - b1)  # m ← β1·m + (1−β1)·g, in float32 whatever g's dtype
            v.mul_(b2).addcmul_(gc, gc, value=1 - b2)  # v ← β2·v + (1−β2)·g²
            root = v.sqrt_()  # √v, in v's buffer
            encode_(st, "m", m, lo)
            encode_(st, "v", root, lo)
            upd = root.div_(root_bc2).add_(g["eps"])  # √v̂ + ε
            flat[lo:hi].sub_(torch.div(m, upd, out=upd).mul_(scale))  # lr·m̂/(√v̂ + ε)

    def load_state_dict(self, state_dict):
        """torch's loader would cast the uint8 codes to the parameter's dtype: it loads the bits=32
        states only, and each 8-bit state tensor keeps its saved dtype (moved to the parameter's device)."""
        eight = {i: st for i, st in state_dict["state"].items() if "m_codes" in st}
        rest = {i: st for i, st in state_dict["state"].items() if i not in eight}
        super().load_state_dict({**state_dict, "state": rest})
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, [p for g in self.param_groups for p in g["params"]]):
            if i in eight:  # the step count stays on the CPU; codes and absmax go where p is
                self.state[p] = {k: v if not torch.is_tensor(v) else v.clone() if k == "step" else v.to(p.device, copy=True)
                                 for k, v in eight[i].items()}


def make_optimizer(model, cfg, train):
    """adamw: train.py's default AdamW, group for group (weight decay on matrices, none on vectors).
    adam8bit: the same hyperparameters in three groups: the factors R (8-bit), the embeddings and
    lm_head (8-bit with --adam8bit_embeddings, else torch's AdamW state), the vectors (torch's)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kw = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    wd, vectors = train.weight_decay, [p for _, p in named if p.dim() < 2]
    if cfg.optimizer == "adamw":
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": wd},
                  {"params": vectors, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], **kw)
    factors = {id(layer.factor) for layer in golore_layers(model)}
    groups = [{"params": [p for _, p in named if id(p) in factors], "weight_decay": wd, "bits": 8},
              {"params": [p for _, p in named if p.dim() >= 2 and id(p) not in factors], "weight_decay": wd,
               "bits": 8 if cfg.adam8bit_embeddings else 32},
              {"params": vectors, "weight_decay": 0.0, "bits": 32}]
    return AdamW8bit([g for g in groups if g["params"]], **kw)


# ----------------------------------------------------------------------------- the periodic event


def is_projection_step(step, cfg):
    return step % cfg.update_proj_gap == 0


def use_random(step, cfg, train):
    """SVD for the first rand_ratio of training, random after (the original's update_step / T >= ratio)."""
    return step / train.num_training_steps >= cfg.rand_ratio


def projection_generator(seed, step, layer=0):
    """The random projectors' RNG: a function of (seed, step, layer index) only, so every rank and both
    update modes (all layers after the backward, or each in its own gradient hook) draw the same P."""
    return torch.Generator().manual_seed(zlib.crc32(f"golore projector {seed} {step} {layer}".encode()))


def project(index, layer, G, step, opt, cfg, train):
    """Layer `index`'s projection event with its full gradient G; W stops taking gradients."""
    gen = projection_generator(train.seed, step, index) if use_random(step, cfg, train) else None
    # GoLore (rand_ratio < 1) re-projects the first moment at every change, GaLore leaves it alone
    layer.kept = layer.merge_and_reinit(G, opt, gen, reproject=cfg.rand_ratio < 1)
    layer.weight.requires_grad_(False)


def step_start(step, model, cfg, train):
    """On projection steps, let autograd produce G = dL/dW into every W.grad."""
    if is_projection_step(step, cfg):
        for layer in golore_layers(model):
            layer.weight.requires_grad_(True)
            layer.full_grad, layer.factor_done = None, False


def before_step(step, model, opt, cfg, train):
    """On projection steps, after the backward: every layer's event, in order (its G all-reduced first)."""
    if is_projection_step(step, cfg):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for i, layer in enumerate(golore_layers(model)):
            G = layer.weight.grad
            if G is None:
                raise RuntimeError("golore: no full gradient on a projection step; call step_start before the forward")
            if world > 1:  # DDP averages only its own parameters; G is ours (gloo has no AVG: sum, divide)
                dist.all_reduce(G)
                G /= world
            project(i, layer, G, step, opt, cfg, train)
            layer.weight.grad = None  # frees this G before the next layer's SVD


def param_step(step, p, model, opt, cfg, train):
    """--per_layer_updates: a layer's event runs in the gradient hook of W or R, whichever comes last.

    On a projection step both W (G) and R (its autograd gradient, which the injected one replaces)
    get a gradient. The event changes R and W in place, which is safe only once the backward is done
    with both (autograd saved R for the input's gradient), so the first of the two hooks waits: R's
    gradient is dropped at once, W's G is held (one layer's G at most). train.py then steps what has
    a gradient: nothing, or R with its injected gradient, exactly once."""
    if not is_projection_step(step, cfg):
        return
    for i, layer in enumerate(golore_layers(model)):
        if p is layer.factor:
            p.grad = None  # never stepped with the autograd gradient of a projection step
            layer.factor_done = True
            if layer.full_grad is not None:  # W came first
                project(i, layer, layer.full_grad, step, opt, cfg, train)
                layer.full_grad = None
            return
        if p is layer.weight:
            if layer.factor_done:
                project(i, layer, p.grad, step, opt, cfg, train)
            else:
                layer.full_grad = p.grad  # train.py drops W.grad after this hook; this reference keeps G
            return


def after_step(step, model, opt, cfg, train):
    """Weight decay on W (see the docstring), and on projection steps the logged metrics."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    layers = golore_layers(model)
    for layer in layers:  # AdamW decayed R by (1 - lr·wd); the same factor on W decays all of W_eff
        g = group.get(id(layer.factor))
        if g and g["weight_decay"]:
            layer.weight.mul_(1 - g["lr"] * g["weight_decay"])
    if not is_projection_step(step, cfg):
        return {}
    # proj_kept: mean share of ‖G‖² inside the new subspaces (SVD: the top-r energy; random: about r/n)
    return {"proj_random": float(use_random(step, cfg, train)),
            "proj_kept": torch.stack([layer.kept for layer in layers]).mean()}


@torch.no_grad()
def export(model, cfg):
    """A plain GPT state dict on the CPU: W_eff under each linear's usual name, made on the device one
    layer at a time and moved at once; the training model is untouched."""
    sd = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GoLoreLinear)}
    for key, value in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if name not in layers:
            sd[key] = value.cpu()
        elif leaf == "weight":
            sd[key] = layers[name].merged_weight().to(value.dtype).cpu()
        elif leaf == "bias":
            sd[key] = value.cpu()
    return sd


# ----------------------------------------------------------------------------- the paper's counterexample


def noisy_toy(n=10, r=4, sigma=1.0, seed=0):
    """A small problem on which GaLore stalls (after the paper's counterexample, repo exp/main.py).

    f(X) = ½‖X_top‖² + <B, X> for X (n×n), X_top its first n-r rows; B is a Gaussian (σ) in its
    top-left (n-r)×(n-r) block and zero elsewhere; minimum f* = -½‖B‖². A stochastic gradient is
    ∇f(X) + ξ with ξ = ±σ on the diagonal of the bottom-right r×r block (a fair coin for the sign):
    zero mean, and it lives where the true gradient is always zero. Once the true gradient's
    singular values drop below σ, the top-r SVD subspace of a sampled gradient is pure noise."""
    g = torch.Generator().manual_seed(seed)
    k = n - r
    B = torch.zeros(n, n, dtype=torch.float64)
    B[:k, :k] = sigma * torch.randn(k, k, generator=g, dtype=torch.float64)
    X0 = torch.zeros(n, n, dtype=torch.float64)
    X0[:k, :k] = 0.5 * sigma * torch.eye(k, dtype=torch.float64)
    X0[k:] = sigma * torch.randn(r, n, generator=g, dtype=torch.float64)
    E = torch.zeros(n, n, dtype=torch.float64)
    E[k:, k:] = sigma * torch.eye(r, dtype=torch.float64)
    f_star = -0.5 * B.pow(2).sum()

    def loss(X):  # f(X) - f*
        return (0.5 * X[:k].pow(2).sum() + (B * X).sum() - f_star).item()

    def grad(X):
        G = B.clone()
        G[:k] += X[:k]
        return G

    def noise(gen):
        return E if torch.rand((), generator=gen, dtype=torch.float64) < 0.5 else -E

    return {"X0": X0, "loss": loss, "grad": grad, "noise": noise, "rank": r}


def projected_adam(problem, steps, rank, gap, lr, rand_ratio, scale=1.0, proj_batch=1, seed=0):
    """Adam through a GoLoreLinear on a matrix problem with noisy gradients; returns f - f* per step.

    The same layer and event as in training: W_eff = W - s·R·P, torch AdamW on R, merge_and_reinit
    every `gap` steps with an SVD projector (step/steps < rand_ratio) or a random one. proj_batch > 1
    averages that many noisy gradients on projection steps (GaLore with a large batch)."""
    X0 = problem["X0"]
    base = nn.Linear(X0.shape[1], X0.shape[0], bias=False, dtype=X0.dtype)
    base.weight.data.copy_(X0)
    layer = GoLoreLinear(base, rank, scale)
    opt = torch.optim.AdamW([layer.factor], lr=lr, weight_decay=0.0)
    noise_gen = torch.Generator().manual_seed(seed)
    losses = []
    for t in range(steps):
        X = layer.merged_weight()
        if t % gap == 0:
            G = sum(problem["grad"](X) + problem["noise"](noise_gen) for _ in range(proj_batch)) / proj_batch
            layer.merge_and_reinit(G, opt, projection_generator(seed, t) if t / steps >= rand_ratio else None,
                                   reproject=rand_ratio < 1)
        else:  # a small-batch gradient, through the chain rule of W - s·R·P
            layer.factor.grad = layer.factor_grad(problem["grad"](X) + problem["noise"](noise_gen))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(problem["loss"](layer.merged_weight()))
    return losses


def projected_adam_demo(problem=None, steps=2000, gap=50, lr=0.01, rand_ratio=0.5, seed=0):
    """GaLore vs GoLore (and large-batch GaLore, full-rank Adam) on `problem` (default: noisy_toy()).

    Returns {"galore": [...], "golore": [...], "galore_large_batch": [...], "adam": [...]}: f - f* per step."""
    problem = problem or noisy_toy()
    r = problem["rank"]
    out = {"galore": projected_adam(problem, steps, r, gap, lr, rand_ratio=math.inf, seed=seed),
           "golore": projected_adam(problem, steps, r, gap, lr, rand_ratio=rand_ratio, seed=seed),
           "galore_large_batch": projected_adam(problem, steps, r, gap, lr, math.inf, proj_batch=256, seed=seed)}
    X = nn.Parameter(problem["X0"].clone())  # full-rank Adam on the same noisy gradients
    opt, gen, out["adam"] = torch.optim.AdamW([X], lr=lr, weight_decay=0.0), torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        X.grad = problem["grad"](X.detach()) + problem["noise"](gen)
        opt.step()
        out["adam"].append(problem["loss"](X.detach()))
    return out
