"""
GoLore: GaLore's gradient subspaces from the SVD early in training, random subspaces late.

    "Subspace Optimization for Large Language Models with Convergence Guarantees",
    Yutong He, Pengrui Li, Yipeng Hu, Chuyan Chen, Kun Yuan (2024; ICML 2025), arXiv:2410.11289.
    Built on GaLore: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Jiawei Zhao et al. (2024), arXiv:2403.03507. Official code: pkumelon/Golore (METHODS.md §4-§5).

The idea. GaLore keeps Adam's state in an r-dimensional subspace of each weight's gradient: every T
steps it takes the top-r singular vectors of the current gradient G as a projector P, runs Adam on
the projected gradient G·Pᵀ (m×r) and applies the update back-projected, ΔW = -lr·s·Adam(G·Pᵀ)·P.
GoLore's observation: G is a *stochastic* gradient. Late in training the true gradient is small and
the minibatch noise dominates G, so the SVD picks a noise subspace in which the expected gradient is
zero, and GaLore stalls (the paper's counterexample; `projected_adam_demo` below reproduces it).
GoLore draws P uniformly from the Stiefel manifold instead, which keeps E[PᵀP] = (r/n)·I and
provably converges. The recipe: SVD for the first `rand_ratio` of training, random after that.

The low-rank form used here (the official README's "ReLoRA-like" path). Each adapted linear y = W x
keeps W (m×n) frozen, a frozen projector P on its smaller side and a trainable factor R on its
larger side, initialised to zero:

    m >= n ("right"):  P (r×n, orthonormal rows),    R (m×r),  W_eff = W - s·R·P
    m <  n ("left"):   P (m×r, orthonormal columns), R (r×n),  W_eff = W - s·P·R

    dL/dR = -s·G·Pᵀ (right) or -s·Pᵀ·G (left), with G = dL/dW_eff

Adam's step does not change when its gradients are scaled by a constant c > 0 and flips with -1
(eps aside: it becomes eps/s), so one Adam step on R moves W_eff by -lr·s·Adam(G·Pᵀ)·P: exactly a
GaLore step with scale s (tests/test_golore.py checks this against an independent GaLore step).
The minus sign is the original's; it cancels through the chain rule. Every T steps (the projection
step):

    W <- W - s·R·P                           merge: W_eff is unchanged
    P <- top-r singular vectors of G         (SVD, step/num_steps < rand_ratio)
      or Haar-random orthonormal matrix      (QR of a Gaussian, afterwards)
    m <- (m·P_old)·P_newᵀ   (left: P_newᵀ·(P_old·m))   Adam's first moment, lifted and re-projected
    R <- 0,  R.grad <- -s·G·P_newᵀ           the full gradient is not wasted: this step also updates

Implementation details
1. Which layers: every q/k/v/o and gate/up/down projection (`model.adapted_linear_names`); the
   embedding, the norms and lm_head stay full-rank and train with plain AdamW, as in the original.
2. Side: GaLore's "std" rule, right projection if m >= n, else left; P is a persistent buffer
   (checkpointed with the model), R a Parameter; both start at zero.
3. The full gradient. Projection steps are the updates with step % update_proj_gap == 0, counting
   from 0 (the original's `update_step % update_proj_gap == 0`), so update 0 chooses the first P.
   `step_start` switches requires_grad on for every W of those steps, so autograd accumulates
   G = dL/dW_eff over the micro-batches of that update with no extra batch; `before_step` takes it
   and switches W off again. R stays in the graph on every step, so DDP (whose parameter set is
   fixed when it is built) sees a gradient for all its parameters.
4. DDP: DDP reduces only its own parameters, so `before_step` all-reduces each G itself (sum, then
   divide by the world size) before the SVD: every rank computes the same P. The random P comes
   from a torch.Generator seeded with (seed, step), drawn on the CPU, the same on every rank.
5. SVD in float32 (float64 stays float64), `full_matrices=False`; if it fails (GaLore#58) it is
   retried in float64 on the CPU. Random P: Q of the QR of an (n×r or m×r) Gaussian, with Q's
   columns multiplied by the signs of the QR's diagonal; this makes Q Haar-distributed (§5.3).
6. Adam: train.py's AdamW over R and the full-rank parameters. Only the first moment is
   re-projected (SGD's momentum_buffer likewise); the second moment and the step count are kept.
7. export() returns W_eff = W - s·R·P (or W - s·P·R) under the plain GPT names: model.pt is an
   ordinary model.py checkpoint.

Deviations from the official code, and why
- The random P comes from QR with the sign fix, not from the polar factor Z(ZᵀZ)^(-1/2) computed
  through an n×n SVD of a rank-r Gram matrix (wasteful and fragile, METHODS.md §5.3), and from a
  seeded generator instead of the global RNG (so ranks agree without relying on lockstep RNG).
- The original clips first and then merges, so its clip norm on a projection step counts the full
  G; here train.py clips after `before_step`, so that norm counts the projected gradient s·G·Pᵀ.
  Between projection steps the two are identical.
- W never enters the optimizer (the original lists it, with grad None) and the merge runs in at
  least float32 (the original merges into bf16 weights). AdamW is torch's (eps inside the bias
  correction), not the HF-style one; pass --adamw_eps 1e-6 for the original's epsilon.
- float16 with a GradScaler is refused: G is not part of the optimizer, so the scaler would not
  unscale it. Use bfloat16 or float32.

Some warnings
- A projection step is a memory spike: one full m×n gradient per adapted layer, plus the SVDs.
- The first update (step 0) uses a projector chosen from one minibatch at random initialisation.
- rand_ratio counts against --num_training_steps: change the length and the switch point moves.
- On GPUs the SVD and the all-reduce are assumed deterministic, so that ranks agree bit for bit;
  `--check_ranks_every` verifies it.

Logged on projection steps: method/proj_random (0: SVD, 1: random) and method/proj_kept, the mean
share of ‖G‖² that the new subspaces keep (top-r energy for the SVD, about r/n for random P).

Usage
    python train.py --method golore                       # tiny defaults: r 32, T 50, rand_ratio 0.8
    python train.py --method golore --rand_ratio 2        # GaLore (never random)
    torchrun --nproc-per-node 2 train.py --method golore --model_config llama_60m --rank 128 \
        --update_proj_gap 200 --lr 1e-3 --adamw_eps 1e-6  # the README's 60M recipe, shorter

Defaults. Paper/README (LLaMA-60M, 10K steps): rank 128 (r/h = 1/4), scale 1.0, update_proj_gap 200
(50 projections), rand_ratio 0.8, lr 1e-3. Here, for `tiny` (h = 128, 500 steps): rank 32 keeps
r/h = 1/4 and update_proj_gap 50 gives 10 projections (the README gap would give 3); scale and
rand_ratio as in the README; lr is train.py's 3e-3.
"""

import math
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


def at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def svd_projector(G, r, right):
    """GaLore's P: top-r right singular vectors (r×n) if right, else left ones (m×r)."""
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

    def __init__(self, base: nn.Linear, r, scale):
        super().__init__()
        m, n = base.weight.shape
        self.r, self.scale, self.right = r, scale, m >= n
        self.weight = base.weight  # W (m, n): frozen; changed only by merges
        self.weight.requires_grad_(False)
        self.bias = base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # P: (r, n) if right else (m, r); zero until the projection at step 0
        self.register_buffer("proj", torch.zeros((r, n) if self.right else (m, r), **kw))
        # R: (m, r) if right else (r, n); zero, so W_eff = W at wrap
        self.factor = nn.Parameter(torch.zeros((m, r) if self.right else (r, n), **kw))

    def extra_repr(self):
        m, n = self.weight.shape
        return f"out={m}, in={n}, r={self.r}, side={'right' if self.right else 'left'}, scale={self.scale}"

    def delta(self):
        """R·P (right) or P·R (left): (m, n); W_eff = W - s·delta()."""
        return self.factor @ self.proj if self.right else self.proj @ self.factor

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # x Wᵀ; W gets a gradient only on projection steps
        if self.right:  # x Pᵀ Rᵀ: (.., n) -> (.., r) -> (.., m)
            low = F.linear(F.linear(x, self.proj), self.factor)
        else:  # x Rᵀ Pᵀ
            low = F.linear(F.linear(x, self.factor), self.proj)
        return y - self.scale * low

    def factor_grad(self, G):
        """dL/dR for the full gradient G = dL/dW_eff: -s·G·Pᵀ (m, r) or -s·Pᵀ·G (r, n)."""
        P = at_least_fp32(self.proj)
        return -self.scale * (G @ P.T if self.right else P.T @ G)

    @torch.no_grad()
    def merged_weight(self):
        """W - s·delta() in at least float32, cast back to W's dtype."""
        return (at_least_fp32(self.weight) - self.scale * at_least_fp32(self.delta())).to(self.weight.dtype)

    @torch.no_grad()
    def merge_and_reinit(self, G, optimizer=None, generator=None):
        """The projection event, given the (all-reduced) full gradient G (m, n).

        generator None: P from the SVD of G (GaLore); else a random P drawn from it (GoLore).
        Returns ‖G·P_newᵀ‖² / ‖G‖², the share of the gradient's energy the new subspace keeps."""
        G = at_least_fp32(G)
        # W <- W - s·R·P: the function is unchanged once R is zeroed below
        self.weight.copy_(self.merged_weight())
        P_old = at_least_fp32(self.proj).clone()
        m, n = self.weight.shape
        P_new = (svd_projector(G, self.r, self.right) if generator is None
                 else random_projector(m, n, self.r, self.right, generator, G.device)).to(P_old)
        self.proj.copy_(P_new)
        # first moment: lift to m×n with P_old, project with P_new; exp_avg_sq and step are kept
        state = optimizer.state.get(self.factor, {}) if optimizer is not None else {}
        for key in ("exp_avg", "momentum_buffer"):
            if torch.is_tensor(state.get(key)):
                M = at_least_fp32(state[key])
                state[key].copy_((M @ P_old) @ P_new.T if self.right else P_new.T @ (P_old @ M))
        self.factor.zero_()
        # R.grad <- -s·G·P_newᵀ: the optimizer still steps on this update
        if self.factor.grad is None:
            self.factor.grad = torch.empty_like(self.factor)
        self.factor.grad.copy_(self.factor_grad(G))
        return (self.factor.grad.pow(2).sum() / (self.scale ** 2 * G.pow(2).sum() + 1e-30)).item()


# ----------------------------------------------------------------------------- model surgery


def golore_layers(model):
    return [m for m in model.modules() if isinstance(m, GoLoreLinear)]


def wrap(model, cfg, train=None):
    """Replace every attn/mlp nn.Linear by a GoLoreLinear (in place). The rest stays trainable."""
    if cfg.r < 1 or cfg.update_proj_gap < 1 or cfg.rand_ratio < 0 or cfg.scale == 0:
        raise ValueError("golore needs --rank >= 1, --update_proj_gap >= 1, --rand_ratio >= 0 and a nonzero --scale")
    if train is not None and train.dtype == "float16":
        raise ValueError("golore does not support --dtype float16 (the GradScaler would not unscale the full "
                         "gradient G); use bfloat16 or float32")
    for name in adapted_linear_names(model):
        parent, _, child = name.rpartition(".")
        base = materialize(model, name)  # real weights for this layer only (the GPT may be a meta skeleton)
        if cfg.r > min(base.weight.shape):
            raise ValueError(f"--rank {cfg.r} exceeds min(out, in) = {min(base.weight.shape)} of {name}")
        setattr(model.get_submodule(parent), child, GoLoreLinear(base, cfg.r, cfg.scale))
    return model


# ----------------------------------------------------------------------------- the periodic event


def is_projection_step(step, cfg):
    return step % cfg.update_proj_gap == 0


def use_random(step, cfg, train):
    """SVD for the first rand_ratio of training, random after (the original's update_step / T >= ratio)."""
    return step / train.num_training_steps >= cfg.rand_ratio


def projection_generator(seed, step):
    """The random projectors' RNG: a function of (seed, step) only, so every rank draws the same P.

    (The offset keeps this stream apart from data.py's batch generator, seeded 1_000_003·seed + step.)"""
    return torch.Generator().manual_seed(1_000_003 * seed + step + 0x601D)


def step_start(step, model, cfg, train):
    """On projection steps, let autograd accumulate G = dL/dW into every W.grad."""
    if is_projection_step(step, cfg):
        for layer in golore_layers(model):
            layer.weight.requires_grad_(True)


def before_step(step, model, opt, cfg, train):
    """On projection steps: all-reduce G, merge, choose the new P, re-project m, inject R's gradient."""
    if not is_projection_step(step, cfg):
        return {}
    rand = use_random(step, cfg, train)
    gen = projection_generator(train.seed, step) if rand else None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    kept = []
    for layer in golore_layers(model):  # same order on every rank: the generator draws agree
        G = layer.weight.grad
        if G is None:
            raise RuntimeError("golore: no full gradient on a projection step; call step_start before the forward")
        if world > 1:  # DDP averages only its own parameters; G is ours (gloo has no AVG: sum, divide)
            dist.all_reduce(G)
            G /= world
        kept.append(layer.merge_and_reinit(G, opt, gen))
        layer.weight.grad = None
        layer.weight.requires_grad_(False)
    # proj_kept: mean share of ‖G‖² inside the new subspaces (SVD: the top-r energy; random: about r/n)
    return {"proj_random": float(rand), "proj_kept": sum(kept) / len(kept)}


@torch.no_grad()
def export(model, cfg):
    """A plain GPT state dict: W_eff under each linear's usual name; the training model is untouched."""
    sd = dict(model.state_dict())
    for name, layer in model.named_modules():
        if isinstance(layer, GoLoreLinear):
            del sd[name + ".proj"], sd[name + ".factor"]
            sd[name + ".weight"] = layer.merged_weight()
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
            layer.merge_and_reinit(G, opt, projection_generator(seed, t) if t / steps >= rand_ratio else None)
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
