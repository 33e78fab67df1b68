# %% [markdown]
# # 05 · LoQT: low-rank adapters over a quantized weight
#
# Loeschcke et al., *LoQT: Low-Rank Adapters for Quantized Pretraining* (NeurIPS 2024,
# arXiv:2405.16528). This notebook imports `loqt.py` and looks at its quantizer, its error
# compensation and what it saves in memory on the `tiny` model.
#
# Each adapted linear $W \in \mathbb{R}^{m\times n}$ is stored as a frozen quantized weight $Q$, a
# frozen projector $P$ (top-$r$ singular vectors of the gradient $G = \partial L/\partial W$) and one
# trainable factor $B$:
#
# $$W = \mathrm{deq}(Q) + s\,B P \quad (n \le m,\ P \in \mathbb{R}^{r\times n}),\qquad
#   \frac{\partial L}{\partial B} = s\, G P^\top .$$
#
# At refresh steps $T_0 = 0 < T_1 < \dots$ (gaps growing) the adapter is merged,
# $W_\text{fp} = \mathrm{deq}(Q) + s\,BP$, a new $P$ is taken from the SVD of that step's $G$, and
# $Q$, $B$ are re-chosen so that $\mathrm{deq}(Q) + s\,BP \approx W_\text{fp}$ by $K$ rounds of
#
# $$Q_k = \mathrm{quant}(C_{k-1}),\quad B_k = \big(W_\text{fp} - \mathrm{deq}(Q_k)\big) P^{+}/s,\quad
#   C_k = W_\text{fp} - s\,B_k P,\qquad C_0 = W_\text{fp},$$
#
# keeping the round with the least $\|W_\text{fp} - \mathrm{deq}(Q_k) - s B_k P\|_F$: the adapter
# absorbs the part of the quantization error that lies in its subspace.
#
# Below: (1) the NF4 code; (2) NF4 vs int8 quantization error on a random matrix; (3) the
# compensation error against $K$; (4) short `tiny` runs: the memory breakdown and the loss of
# full-rank training vs LoQT (NF4 weights, float32 Adam) and LoQT with NF4 + 8-bit Adam.

# %%
import contextlib
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(".."))
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

import loqt
import train

%config InlineBackend.figure_format = 'png'
plt.rcParams["figure.dpi"] = 70
torch.set_num_threads(1)  # these notebooks are built on a shared 2-core CPU
T_START = time.time()

FAST = os.environ.get("FAST") == "1"  # the tests run every notebook with FAST=1 (seconds)
STEPS = 8 if FAST else 60  # updates of the tiny runs
GAP = 3 if FAST else 15  # --update_proj_gap (tau); the file's default 50 is for 500 steps
KS = range(0, 6) if FAST else range(0, 11)
OUT = tempfile.mkdtemp(prefix="loqt_")
print(f"{STEPS} updates, tau={GAP}, K in {list(KS)}")

# %% [markdown]
# ## 1 · The NF4 code
# `loqt.nf4_code()`: 16 levels at quantiles of $\mathcal N(0,1)$ (8 positive, 7 negative, an exact
# zero), scaled to $[-1, 1]$. A block of 64 weights is divided by its absmax and each entry is
# rounded to the nearest level; int8 (`"8bit"`) uses 255 evenly spaced levels instead.

# %%
nf4 = loqt.nf4_code()
print("NF4 levels:", [round(v, 4) for v in nf4.tolist()])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(range(16), nf4.numpy(), "o-", label="NF4 (16 levels)")
axes[0].plot(np.linspace(0, 15, 16), np.linspace(-1, 1, 16), "--", color="gray", label="16 evenly spaced")
axes[0].set(xlabel="code", ylabel="level", title="loqt.nf4_code()")
axes[0].legend(fontsize=8)
x = torch.randn(64 * 2000, generator=torch.Generator().manual_seed(0))
blocks = x.view(-1, 64)
normed = (blocks / blocks.abs().amax(1, keepdim=True)).flatten()
axes[1].hist(normed.numpy(), bins=80, density=True, color="C0", alpha=0.5, label="N(0,1) / block absmax")
for v in nf4.numpy():
    axes[1].axvline(v, color="C1", lw=0.8)
axes[1].set(xlabel="value", title="NF4 levels over normalized Gaussian blocks")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
idx = torch.bucketize(normed, (nf4[1:] + nf4[:-1]) / 2)
use = torch.bincount(idx, minlength=16).float() / idx.numel()
even = torch.linspace(-1, 1, 16)
use_even = torch.bincount(torch.bucketize(normed, (even[1:] + even[:-1]) / 2), minlength=16).float() / idx.numel()
print("share of entries per level, NF4:          ", [round(v, 3) for v in use.tolist()])
print("share of entries per level, evenly spaced:", [round(v, 3) for v in use_even.tolist()])
for name, u in (("NF4", use), ("evenly spaced", use_even)):
    inner = u[1:-1]
    print(f"{name:14s} inner 14 levels: max/min share {(inner.max() / inner.min()).item():6.1f} | "
          f"entropy {-(u * torch.log2(u.clamp_min(1e-12))).sum().item():.2f} bits of 4")

# %% [markdown]
# The levels are dense near zero, where Gaussian weights are: the inner levels are used far more
# evenly than evenly spaced levels would be (the max/min ratio and the entropy of the code usage
# above), so the 4 bits carry more information per weight.
#
# ## 2 · Quantization error on a random matrix
# A Gaussian $352\times 128$ matrix (the shape of `tiny`'s `up_proj`) through `loqt.QuantizedTensor`:
# relative Frobenius error $\|\mathrm{deq}(\mathrm{quant}(W)) - W\|_F / \|W\|_F$ and the stored bits per
# weight (codes plus block scales), for NF4, NF4 with double-quantized scales, and int8.

# %%
W = 0.02 * torch.randn(352, 128, generator=torch.Generator().manual_seed(1))
rows = []
for label, kind, dq in (("NF4", "4bit", False), ("NF4 + double quant", "4bit", True), ("int8", "8bit", False)):
    q = loqt.QuantizedTensor(W, kind, dq)
    err = ((q.dequantize() - W).norm() / W.norm()).item()
    bits = sum(t.numel() * t.element_size() for t in q.state_dict().values()) * 8 / W.numel()
    rows.append((label, err, bits))
    print(f"{label:20s} relative error {err:.4f} | {bits:.3f} bits per weight")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.bar([r[0] for r in rows], [r[1] for r in rows], color=["C0", "C2", "C1"])
for i, r in enumerate(rows):
    ax.text(i, r[1], f"{r[2]:.2f} bits", ha="center", va="bottom", fontsize=8)
ax.set(ylabel="relative error", title="block-wise quantization, blocks of 64")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · Error compensation against $K$
# A `LoQTLinear` of that shape (rank 32, the file's default), with $P$ set from the SVD of a random
# low-rank-plus-noise "gradient" and a target $W_\text{fp}$; `loqt.compensated_init(layer, W_fp, K)`
# returns the kept error and plain requantization's error, as 0-dim tensors ($K=0$: $B = 0$). We also
# run the same with $P$ stored in float32 (`quantize_projection_matrix="none"`).

# %%
g = torch.Generator().manual_seed(2)
G = torch.randn(352, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(352, 128, generator=g)
W_fp = W.clone()
curves = {}
for p_kind in ("4bit", "none"):
    layer = loqt.LoQTLinear(nn.Linear(128, 352, bias=False), loqt.Config(quantize_projection_matrix=p_kind))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    layer.P.load_(layer.P.encode(Vh[:layer.r] if layer.left else U[:, :layer.r]))
    curves[p_kind] = [loqt.compensated_init(layer, W_fp, K)[0].item() / W_fp.norm().item() for K in KS]
fig, ax = plt.subplots(figsize=(6, 3.2))
for p_kind, c in curves.items():
    ax.plot(list(KS), c, "o-", ms=4, label=f"P stored as {'NF4' if p_kind == '4bit' else 'float32'}")
ax.set(xlabel="K (compensation rounds)", ylabel="||W_fp - deq(Q) - sBP|| / ||W_fp||",
       title="loqt.compensated_init, NF4 weight, r = 32")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
for p_kind, c in curves.items():
    print(f"P {p_kind:5s}: K=0 {c[0]:.4f} | K=1 {c[1]:.4f} | K={KS[-1]} {c[-1]:.4f} "
          f"({1 - c[-1] / c[0]:.1%} below plain requantization)")
print(f"if the error were isotropic, one projection onto a rank-32 subspace of 128 would remove "
      f"1 - sqrt(1 - 32/128) = {1 - np.sqrt(0.75):.1%} of its norm; K=1 removes {1 - curves['4bit'][1] / curves['4bit'][0]:.1%}")

# %% [markdown]
# The first round ($K=1$) only adds the part of the requantization error that lies in the span of
# $P$ to $B$; the later rounds also re-choose $Q$ (quantizing $C_k$ instead of $W_\text{fp}$), which
# is what takes the error further down. Storing $P$ in NF4 instead of float32 makes almost no
# difference here (the two curves).
#
# ## 4 · Short runs: memory and loss
# `train.main` writes `summary.json` with the bytes of the stored state: `param_bytes` (the model's
# state dict: NF4 codes and scales count at their real size), `grad_bytes` (gradients of trainable
# parameters) and `optimizer_state_bytes`. Three runs on the same data: full-rank AdamW, LoQT (NF4
# weights and projectors, float32 AdamW on $B$) and LoQT with `--optimizer adam8bit --use_double_quant`.
# Refreshes every `tau` growing exponentially (the file's default progression).

# %%
COMMON = ["--max_length", "64", "--batch_size", "8", "--num_training_steps", str(STEPS),
          "--warmup_steps", str(max(1, STEPS // 10)), "--eval_every", str(STEPS // 2 if FAST else STEPS // 4),
          "--eval_tokens", "1024" if FAST else "8192", "--log_every", "1", "--sample_tokens", "0",
          "--data_dir", os.path.abspath("../data_cache")]


def run(name, args):
    t0, backend = time.time(), plt.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):  # train.py prints every logged update
        res = train.main(["--save_dir", os.path.join(OUT, name)] + COMMON + args)
    plt.switch_backend(backend)  # train.py's loss.png switches matplotlib to Agg; back to inline
    s = res["summary"]
    print(f"{name:22s} val_loss {s['val_loss']:.4f} | trainable {s['trainable_params']:,} of {s['total_params']:,} "
          f"| {time.time() - t0:.0f}s")
    return res


lq = ["--method", "loqt", "--update_proj_gap", str(GAP)]
results = {"full (AdamW)": run("full", ["--method", "full"]),
           "LoQT NF4 + AdamW": run("loqt", lq),
           "LoQT NF4 + adam8bit": run("loqt8", lq + ["--optimizer", "adam8bit", "--use_double_quant"])}
print("refresh steps:", loqt.refresh_steps(loqt.Config(update_proj_gap=GAP), STEPS))

# %%
import json

summaries = {k: json.load(open(os.path.join(OUT, d, "summary.json")))
             for k, d in zip(results, ("full", "loqt", "loqt8"))}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
names, bottom = list(summaries), np.zeros(len(summaries))
for key, label in (("param_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_state_bytes", "optimizer")):
    vals = np.array([summaries[n][key] / 2**20 for n in names])
    axes[0].bar(names, vals, bottom=bottom, label=label)
    bottom += vals
axes[0].set(ylabel="MiB", title="stored state (summary.json)")
axes[0].tick_params(axis="x", labelsize=8)
axes[0].legend(fontsize=8)
for i, (name, res) in enumerate(results.items()):
    rows = [r for r in res["metrics"] if "loss" in r]
    axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", lw=1, alpha=0.8, label=name)
    ev = [r for r in res["metrics"] if "val_loss" in r]
    axes[1].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o", color=f"C{i}", ms=4)
for t in loqt.refresh_steps(loqt.Config(update_proj_gap=GAP), STEPS)[1:]:
    axes[1].axvline(t + 1, color="k", ls=":", lw=0.8)
axes[1].set(xlabel="step", ylabel="loss (line: train, dots: val)", title="loss; dotted: refreshes")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
full_total = sum(summaries["full (AdamW)"][k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"))
for n in names:
    s = summaries[n]
    tot = s["param_bytes"] + s["grad_bytes"] + s["optimizer_state_bytes"]
    print(f"{n:22s} weights {s['param_bytes'] / 2**20:5.2f} | grads {s['grad_bytes'] / 2**20:5.2f} | "
          f"optimizer {s['optimizer_state_bytes'] / 2**20:5.2f} MiB | total {tot / full_total:.0%} of full | "
          f"val_loss {s['val_loss']:.4f}")
for n in names[1:]:
    ev = [(r["step"] - 1, r["method/quant_err"], r["method/quant_err_uncompensated"])
          for r in results[n]["metrics"] if "method/quant_err" in r]
    print(n, "refresh (update, rel. error kept, uncompensated):", [(t, round(a, 4), round(b, 4)) for t, a, b in ev])
sd = torch.load(os.path.join(OUT, "full", "model.pt"), weights_only=True)["model"]
adapted = sum(v.numel() for k, v in sd.items() if ("attn" in k or "mlp" in k) and k.endswith(".weight") and v.dim() == 2)
total = sum(v.numel() for v in sd.values())
b_params = summaries["LoQT NF4 + AdamW"]["trainable_params"] - (total - adapted)
print(f"adapted (quantized) linears: {adapted:,} of {total:,} parameters ({adapted / total:.0%}); "
      f"the rest (embeddings, lm_head, norms) stays float32 and full-rank")
print(f"the factors B (r x max(m, n), float32, trained): {b_params:,} numbers = {b_params / adapted:.0%} of the "
      f"adapted weights, {4 * b_params / summaries['LoQT NF4 + AdamW']['param_bytes']:.0%} of LoQT's weight bytes")

# %% [markdown]
# LoQT's stored state is a fraction of full-rank training's (the `total` column), and 8-bit Adam
# with double quantization takes it further down. A large part of what is left on `tiny` is the
# trainable factors $B$: with $r = 32$ on 128-wide layers, $r\times\max(m,n)$ is a quarter of each
# adapted weight, kept in float32 with its gradient and Adam moments (the last printed line gives
# its share of the weight bytes).
#
# After each refresh past the first the compensated error (`method/quant_err`) is below plain
# requantization's (`quant_err_uncompensated`), as in
# section 3. At update 0 the weight was just quantized by the wrap: requantizing it is exact with
# plain NF4 scales, and nearly so with double-quantized ones (the small error of the adam8bit run,
# which also has `--use_double_quant`). The loss curves are single short runs with one seed.
#
# ## What to try next
# - `--quantize_w 8bit` or `none`, and `--compensate_quant_error_iterations 0`: how much loss does NF4
#   storage cost, and how much does compensation win back?
# - `--refresh_optimizer_state keep | reset | project` (the docstring's measured table).
# - A larger preset (`--model_config llama_60m`): how does the memory breakdown change with the width?
# - Memory at paper scale, on fake tensors (seconds to a minute on a CPU): `python memory.py --methods
#   full,loqt --model_config llama_7b --storage_dtype bfloat16 --method_args "loqt=--lora_r 1024
#   --optimizer adam8bit --use_offloading"`, or with `--per_layer_updates --grad_clipping 0` instead of
#   offloading; `loqt.py`'s docstring has the table.
