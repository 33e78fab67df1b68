# %% [markdown]
# # 03 · GoLore: random subspaces where GaLore's SVD stalls
#
# He et al., *Subspace Optimization for Large Language Models with Convergence Guarantees*
# (ICML 2025, arXiv:2410.11289), built on GaLore (Zhao et al., arXiv:2403.03507). This notebook
# imports `golore.py` and runs its own toy problem and its training hooks.
#
# **GaLore** keeps Adam's state in an $r$-dimensional subspace of each weight's gradient. Every $T$
# steps it picks a projector $P \in \mathbb{R}^{r\times n}$ (orthonormal rows) from the top-$r$ right
# singular vectors of the current stochastic gradient $G$, and in between it steps
#
# $$\Delta W = -\eta\, s\, \mathrm{Adam}(G P^\top)\, P .$$
#
# In `golore.py` this is a layer $W_\text{eff} = W - s\,R\,P$ with $W$ and $P$ frozen and only
# $R \in \mathbb{R}^{m\times r}$ trained (Adam on $R$ is exactly the GaLore step); at each projection
# step $R$ is merged into $W$ and $P$ is replaced. A GoLore run (`rand_ratio < 1`) also re-projects
# Adam's first moment into the new subspace, as the official GoLore code does; a GaLore run
# (`rand_ratio >= 1`) leaves both moments as they are, as `galore_torch` does.
#
# **The problem.** $G = \nabla f + \xi$ is a *minibatch* gradient. Late in training $\nabla f$ is
# small while the noise $\xi$ is not, so the top-$r$ SVD of $G$ picks a subspace where
# $\mathbb{E}[G] = 0$: GaLore stops making progress. **GoLore** draws $P$ uniformly (Haar) from the
# Stiefel manifold instead, so that
#
# $$\mathbb{E}[P^\top P] = \tfrac{r}{n} I,$$
#
# every direction is visited on average and the method provably converges. The recipe: SVD
# projectors for the first `rand_ratio` of training (they are better while the signal dominates),
# random ones afterwards.
#
# Below: (1) the paper's counterexample with `golore.projected_adam_demo`, (2) what the two
# projectors keep of a gradient, (3) a short `tiny`-LM run with the SVD→random switch marked,
# (4) what storing $R$ in bf16 costs in precision.

# %%
import contextlib
import io
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(".."))
import matplotlib.pyplot as plt
import numpy as np
import torch

import golore
import train

%config InlineBackend.figure_format = 'png'
plt.rcParams["figure.dpi"] = 70
torch.set_num_threads(1)  # these notebooks are built on a shared 2-core CPU
T_START = time.time()

FAST = os.environ.get("FAST") == "1"  # the tests run every notebook with FAST=1 (seconds)
TOY_STEPS, TOY_GAP, TOY_LR = (200, 10, 0.03) if FAST else (2000, 50, 0.01)
LM_STEPS = 8 if FAST else 60  # updates of the tiny-LM runs
LM_GAP = 2 if FAST else 6  # --update_proj_gap
RAND_RATIO = 0.5
OUT = tempfile.mkdtemp(prefix="golore_")
print(f"toy: {TOY_STEPS} steps, T={TOY_GAP}, lr={TOY_LR} | LM: {LM_STEPS} updates, T={LM_GAP}, rand_ratio={RAND_RATIO}")

# %% [markdown]
# ## 1 · The counterexample
# `golore.noisy_toy()` ($n=10$, $r=4$): $f(X) = \tfrac12\|X_\text{top}\|^2 + \langle B, X\rangle$,
# where the true gradient lives in the top $(n-r)$ rows and the noise $\xi = \pm\sigma I_r$ only in the
# bottom-right $r\times r$ block, where the true gradient is always zero. `projected_adam_demo` runs
# through the same `GoLoreLinear` and `merge_and_reinit` used in training:
# - **GaLore**: SVD projector every $T$ steps, from one noisy gradient;
# - **GoLore**: SVD for the first half (`rand_ratio=0.5`), random after;
# - **GaLore, large batch**: SVD from the mean of 256 noisy gradients (the noise averages out);
# - **Adam**: full-rank Adam on the same noisy gradients.

# %%
t0 = time.time()
demo = golore.projected_adam_demo(steps=TOY_STEPS, gap=TOY_GAP, lr=TOY_LR, rand_ratio=RAND_RATIO)
print(f"({time.time() - t0:.1f}s)")
plt.figure(figsize=(6, 3.5))
for key, label in (("galore", "GaLore (SVD)"), ("golore", f"GoLore (random after {RAND_RATIO:.0%})"),
                   ("galore_large_batch", "GaLore, SVD of 256-sample mean"), ("adam", "full-rank Adam")):
    plt.semilogy(np.maximum(demo[key], 1e-12), label=label)
plt.axvline(RAND_RATIO * TOY_STEPS, color="k", ls=":", lw=0.8)
plt.xlabel("iteration")
plt.ylabel("f(X) - f*")
plt.title("noisy_toy: n=10, r=4")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()
half = int(RAND_RATIO * TOY_STEPS) - 1
for key in demo:
    print(f"{key:20s} f-f* at the switch {demo[key][half]:.3g}   at the end {demo[key][-1]:.3g}")

# %% [markdown]
# GaLore's loss sits on a plateau once the top-4 singular directions of the sampled gradient are the
# noise block: from the switch to the end it barely moves (its first moment, left in the old
# coordinates at each change as `galore_torch` leaves it, still nudges it a little), while GoLore,
# with the same optimizer and the same noisy gradients, keeps going down after its projector
# becomes random. The large-batch
# SVD avoids the stall by paying for 256 gradient samples on each projection step.
#
# ## 2 · What each projector keeps
# Near the optimum, how much of the *sampled* gradient and of the *true* gradient does each
# projector keep? `golore.svd_projector` and `golore.random_projector` are the functions the layer
# calls. For a right projector the kept share is $\|G P^\top\|^2 / \|G\|^2$.

# %%
prob = golore.noisy_toy()
X = prob["X0"].clone()
n, r = X.shape[0], prob["rank"]
k = n - r
B = prob["grad"](torch.zeros_like(X))  # grad f(0) = B; the true gradient vanishes at X_top = -B_top
X[:k] = -B[:k]
gen = torch.Generator().manual_seed(0)
rows = []
for eps in (1.0, 0.3, 0.1, 0.03):
    Xe = X.clone()
    Xe[:k] += eps * torch.randn(k, n, generator=gen, dtype=X.dtype)  # a point near the optimum
    g_true = prob["grad"](Xe)
    G = g_true + prob["noise"](gen)
    P_svd = golore.svd_projector(G, prob["rank"], right=True)
    kept = lambda M, P: (M @ P.T).pow(2).sum().item() / M.pow(2).sum().item()
    rnd = [kept(g_true, golore.random_projector(n, n, prob["rank"], True, torch.Generator().manual_seed(s)))
           for s in range(200)]
    rows.append((g_true.norm().item(), kept(G, P_svd), kept(g_true, P_svd), float(np.mean(rnd))))
print(f"{'||grad f||':>10s} {'SVD keeps of G':>15s} {'SVD keeps of grad f':>20s} {'random keeps of grad f':>23s}")
for row in rows:
    print(f"{row[0]:10.3f} {row[1]:15.3f} {row[2]:20.3f} {row[3]:23.3f}")
print(f"r/n = {r / n:.2f}, noise norm ||xi|| = {prob['noise'](gen).norm().item():.2f}")

# %% [markdown]
# When $\|\nabla f\|$ drops towards the noise level $\|\xi\| = \sigma\sqrt{r} = 2$, the SVD subspace
# captures most of the *sampled* gradient but less and less of the *true* one, while a Haar-random
# subspace keeps about $r/n$ of it on average, whatever the noise.
#
# ## 3 · A tiny LM: SVD first, random later
# `train.main(["--method", "golore", ...])` with `--rand_ratio 0.5`: projection steps every
# `--update_proj_gap` updates; before half of training they use the SVD, after it random
# projectors. The method logs `method/proj_random` and `method/proj_kept` (the share of $\|G\|^2$
# the new subspaces keep, averaged over layers) on each projection step. A GaLore run
# (`--rand_ratio 2`: never random) and full-rank training run on the same data for comparison.

# %%
COMMON = ["--max_length", "64", "--batch_size", "8", "--num_training_steps", str(LM_STEPS),
          "--warmup_steps", str(max(1, LM_STEPS // 10)), "--eval_every", str(LM_STEPS // 2 if FAST else LM_STEPS // 4),
          "--eval_tokens", "1024" if FAST else "8192", "--log_every", "1", "--sample_tokens", "0",
          "--data_dir", os.path.abspath("../data_cache")]


def run(name, args):
    t0, backend = time.time(), plt.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):  # train.py prints every logged update
        res = train.main(["--save_dir", os.path.join(OUT, name)] + COMMON + args)
    plt.switch_backend(backend)  # train.py's loss.png switches matplotlib to Agg; back to inline
    s = res["summary"]
    print(f"{name:7s} val_loss {s['val_loss']:.4f} | trainable {s['trainable_params']:,} of {s['total_params']:,} "
          f"| optimizer state {s['optimizer_state_bytes'] / 2**20:.2f} MiB | {time.time() - t0:.0f}s")
    return res


lm = {"GoLore": run("golore", ["--method", "golore", "--update_proj_gap", str(LM_GAP), "--rand_ratio", str(RAND_RATIO)]),
      "GaLore": run("galore", ["--method", "golore", "--update_proj_gap", str(LM_GAP), "--rand_ratio", "2"]),
      "full": run("full", ["--method", "full"])}

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for i, (name, res) in enumerate(lm.items()):
    rows = [r for r in res["metrics"] if "loss" in r]
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", lw=1, alpha=0.8, label=name)
    ev = [r for r in res["metrics"] if "val_loss" in r]
    axes[0].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o", color=f"C{i}", ms=4)
switch = min(t for t in range(LM_STEPS) if golore.use_random(t, golore.Config(rand_ratio=RAND_RATIO),
                                                             train.TrainConfig(num_training_steps=LM_STEPS)))
axes[0].axvline(switch + 1, color="k", ls="--", lw=1, label=f"SVD → random (update {switch})")
axes[0].set(xlabel="step", ylabel="loss (line: train, dots: val)", title="tiny LM")
axes[0].legend(fontsize=8)
for name in ("GoLore", "GaLore"):
    ev = [r for r in lm[name]["metrics"] if "method/proj_kept" in r]
    axes[1].plot([r["step"] - 1 for r in ev], [r["method/proj_kept"] for r in ev], "o-", ms=4, label=name)
axes[1].axvline(switch, color="k", ls="--", lw=1)
axes[1].set(xlabel="update", ylabel="share of ||G||² kept", title="method/proj_kept", ylim=(0, 1.05))
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
for name in ("GoLore", "GaLore"):
    ev = [r for r in lm[name]["metrics"] if "method/proj_kept" in r]
    print(name, "projection steps (update, random?, kept):",
          [(r["step"] - 1, int(r["method/proj_random"]), round(r["method/proj_kept"], 3)) for r in ev])

# %% [markdown]
# On the LM, the SVD subspace of a layer keeps almost all of the minibatch gradient's energy (the
# gradients of this small model are close to low-rank), and a random subspace keeps far less,
# roughly $r/n$ for the layer's smaller side. Whether that costs loss at this scale is read off the
# curves and the final validation losses printed above; with this few updates the run is far from
# the late, noise-dominated regime where the toy shows GaLore stalling, so no ranking of GoLore
# against GaLore on the LM should be read into a single short run.

# %% [markdown]
# ## 4 · bf16 storage: the precision of $R$
# With `--storage_dtype bfloat16`, $R$ and its AdamW state are bf16 by default, as in the originals'
# pure-bf16 runs (`--factor_dtype float32` keeps them in float32, 8 more bytes per entry of $R$:
# at llama_7b, $r = 1024$, with per-layer updates 26.4 instead of 38.5 GiB, see `golore.py`).
# $R$ starts at zero after each projection and sums up to $T$ AdamW steps; late in a cycle each step
# is a small fraction of the sum, which bf16's 8-bit mantissa rounds. Below: the same $T$ AdamW steps
# (gradients with a per-entry drift plus noise) summed into a bf16 tensor and into a float32 one,
# for $R$ (starting at zero, lr $10^{-3}$) and for a pure-bf16 GaLore weight (starting at
# $\mathcal{N}(0, 0.02^2)$, lr $0.01 \cdot$ scale $0.25$), as the relative error of the sum.

# %%
def bf16_sum_error(T, start, lr, n=4000 if FAST else 20000):
    """‖Δ_bf16 - Δ_fp32‖ / ‖Δ_fp32‖ for Δ = the sum of T AdamW steps on the same gradients."""
    mu = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(0))  # each entry's drift
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
        noise = torch.Generator().manual_seed(1)
        for _ in range(T):
            p.grad = (mu + torch.randn(n, generator=noise)).to(dtype)
            opt.step()
        out[dtype] = p.detach().float() - start.to(dtype).float()
    return ((out[torch.bfloat16] - out[torch.float32]).norm() / out[torch.float32].norm()).item()


n = 4000 if FAST else 20000
W0 = 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(2))
print(f"{'T':>4s} {'R from 0 (GoLore, bf16 R)':>27s} {'W (pure-bf16 GaLore)':>22s}")
for T in (50, 200, 500):
    print(f"{T:4d} {bf16_sum_error(T, torch.zeros(n), 1e-3):27.3f} {bf16_sum_error(T, W0, 2.5e-3):22.3f}")

# %% [markdown]
# Both lose a few percent of the update at $T = 200$ and about an eighth at $T = 500$ (the 7B
# recipe's gap): bf16 $R$ is about as lossy as the originals' pure-bf16 GaLore, and
# `--factor_dtype float32` is there for runs where that matters. The merge itself is computed in
# float32 and rounds $W$ once per projection.

# %%
print(f"notebook run time: {time.time() - T_START:.0f}s")

# %% [markdown]
# ## What to try next
# - Toy: raise `sigma` in `golore.noisy_toy(sigma=...)`, or move `rand_ratio`, and see when the
#   GoLore curve leaves GaLore's plateau.
# - LM: train longer (`--num_training_steps 500`, the file's defaults `--update_proj_gap 50`) and compare
#   `--rand_ratio 0.8` (GoLore) with `--rand_ratio 2` (GaLore) over several seeds.
# - Try `--rank 8` vs `--rank 64`: the random projector keeps about r/n of the gradient.
