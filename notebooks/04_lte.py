# %% [markdown]
# # 04 · LTE: many LoRA heads in parallel, merged by averaging
#
# Huh, Cheung, Bernstein, Isola, Agrawal, *Training Neural Networks from Scratch with Parallel
# Low-Rank Adapters* (arXiv:2402.16828). This notebook imports `lte.py` and looks at what its heads
# see, what a merge does, how the loss depends on the number of heads and the merge interval, and
# how many bytes would travel between workers.
#
# Every linear layer keeps a frozen main weight $W \in \mathbb{R}^{m\times n}$ and $N$ LoRA heads
# $A_h \in \mathbb{R}^{r\times n}$, $B_h \in \mathbb{R}^{m\times r}$, $h = 1\dots N$. Each head plays
# one worker: the batch is cut into $N$ equal chunks and chunk $h$ goes through head $h$ only,
#
# $$y_h = W x_h + s\,(B_h A_h - B_h' A_h')\,x_h, \qquad s = \alpha / r,$$
#
# where $(A_h', B_h')$ are head $h$'s factors at the last merge (zero at first). Every $T$ =
# `merge_iter` updates the heads' progress since the last merge is averaged into $W$,
#
# $$W \leftarrow W + \frac{1}{N}\sum_{h=1}^{N} s\,(B_h A_h - B_h' A_h'), \qquad A_h' \leftarrow A_h,\; B_h' \leftarrow B_h,$$
#
# and the heads carry on from where they are (the "reset-less" variant of the official code;
# `--reset_lora` re-draws them instead). Embeddings and RMSNorm gains get one copy per head
# (`Replicas`), averaged at the same merges. Evaluation uses $W$ (and the merged copies) alone.
# Only the merges need communication between workers; `--mode local` makes that literal.
#
# Sections: (1) which rows of a batch reach which head, read off the real layers; (2) what a merge
# does and does not change, numerically; (3) loss against the number of heads $N$ and the merge
# interval $T$ (short `train.main` runs); (4) bytes communicated per update from
# `lte.comm_bytes_per_step`, against full-rank DDP, for model presets up to `llama_1b`; (5) memory
# at scale (`memory.py` on fake tensors) and why the heads stay float32 under bf16 storage.

# %%
import contextlib
import copy
import dataclasses
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(".."))
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import data as data_lib
import lte
import train
from model import GPT, get_config

%config InlineBackend.figure_format = 'png'
plt.rcParams["figure.dpi"] = 70
torch.set_num_threads(1)  # these notebooks are built on a shared 2-core CPU
T_START = time.time()

FAST = os.environ.get("FAST") == "1"  # the tests run every notebook with FAST=1 (seconds)
DATA_DIR = os.path.abspath("../data_cache")
OUT = tempfile.mkdtemp(prefix="lte_")
print({f.name: getattr(lte.Config(), f.name) for f in dataclasses.fields(lte.Config)})

# %% [markdown]
# ## 1 · What the heads see
#
# A `tiny` model (4 layers, width 128, byte vocabulary) wrapped by `lte.wrap` with the file's
# defaults (printed above: $N = 4$ heads of rank $r = 32$), a batch of 8 sequences of 64 tokens, so
# chunk $h$ is rows $2h, 2h+1$. A few AdamW updates (no merge yet) make the heads differ.

# %%
torch.manual_seed(0)
folder = data_lib.prepare("builtin", data_dir=DATA_DIR, log=lambda *a: None)
data = data_lib.TokenData(folder, max_length=64, seed=0)
BATCH, HEADS = 8, 4
cfg = lte.Config(num_heads=HEADS)
tc = train.TrainConfig(batch_size=BATCH)
model = GPT(get_config("tiny", vocab_size=data.vocab_size))
lte.wrap(model, cfg, tc)
opt = lte.make_optimizer(model, cfg, tc)
val = data.val_windows(BATCH * 64)  # 8 fixed validation windows (65 tokens each)
vx, vy = val[:, :-1], val[:, 1:]
lte_linears = [(n, m) for n, m in model.named_modules() if isinstance(m, lte.LTELinear)]
replicas = [(n, m) for n, m in model.named_modules() if isinstance(m, lte.Replicas)]
print(f"{len(lte_linears)} LTELinear layers (lm_head included), {len(replicas)} Replicas "
      f"(embedding + norm gains); trainable {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
      f"vs {sum(p.numel() for p in lte.export(model, cfg).values()):,} in the plain model; s = {cfg.lora_alpha / cfg.lora_r:g}")


def train_steps(k, step0=0, merge=False):
    """k AdamW updates on real batches, as train.py does them (LTE's per-head clip, then train.py's
    global clip, which it leaves unchanged; constant --lr)."""
    model.train()
    for step in range(step0, step0 + k):
        x, y = data.batch(step, BATCH, BATCH)
        model(x, y)[1].backward()
        lte.before_step(step, model, opt, cfg, tc)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if merge:
            lte.after_step(step, model, opt, cfg, tc)


train_steps(2 if FAST else 5)

# %% [markdown]
# **Forward.** Hook one layer (`layers.1.mlp.up_proj`), take its input $x$ and output $y$ for the
# training batch, and measure for every row $b$ and head $h$ how far $y_b$ is from head $h$'s
# function $W x_b + s(B_hA_h - B_h'A_h')x_b$ (relative to the size of the LoRA part).
#
# **Backward.** For every row $b$ alone, the gradient of its loss with respect to each head's
# trainable tensors (all `lora_A`, `lora_B` and replica copies, whole model).

# %%
x, y = data.batch(100, BATCH, BATCH)
layer = model.get_submodule("layers.1.mlp.up_proj")
seen = {}
hook = layer.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach(), y=out.detach()))
model.train()
logits = model(x)[0]
hook.remove()
A, B = layer.factors()  # [A_h; A_h'] and [B_h, -B_h']: one rank-2r pair per head
with torch.no_grad():
    base = F.linear(seen["x"], layer.weight)
    fwd = np.zeros((BATCH, HEADS))
    for h in range(HEADS):
        yh = base + layer.scaling * (seen["x"] @ A[h].T) @ B[h].T
        fwd[:, h] = ((seen["y"] - yh).flatten(1).norm(dim=1) / (seen["y"] - base).flatten(1).norm(dim=1)).numpy()

head_params = [p for _, p in model.named_parameters() if p.requires_grad]  # each has the head index first
per_row = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(BATCH, -1).mean(1)
bwd = np.zeros((BATCH, HEADS))
for b in range(BATCH):
    grads = torch.autograd.grad(per_row[b], head_params, retain_graph=True)
    bwd[b] = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt().numpy()

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
im = axes[0].imshow(np.log10(fwd + 1e-12), cmap="viridis_r", aspect="auto", vmin=-12)
axes[0].set(title="forward: log10 distance of y_b\nfrom head h's function", xlabel="head h", ylabel="batch row b")
fig.colorbar(im, ax=axes[0])
im = axes[1].imshow(np.log10(bwd + 1e-30), cmap="magma", aspect="auto", vmin=-30)
axes[1].set(title="backward: log10 |grad of row b's loss|\non head h's tensors", xlabel="head h")
fig.colorbar(im, ax=axes[1])
for ax in axes:
    ax.set_xticks(range(HEADS)), ax.set_yticks(range(BATCH))
fig.tight_layout()
plt.show()
own = np.arange(BATCH) // (BATCH // HEADS)  # the head of each row
mask = own[:, None] == np.arange(HEADS)[None, :]
print(f"forward: distance to own head max {fwd[mask].max():.1e}, to the other heads min {fwd[~mask].min():.2f}")
print(f"backward: gradient norm on own head min {bwd[mask].min():.2e}, on other heads max {bwd[~mask].max():.1e}")

# %% [markdown]
# Row $b$ goes through head $\lfloor b / (B/N) \rfloor$ and nowhere else: its output is exactly
# that head's function (distance 0) and about as far from the other heads' as the LoRA part is
# large (relative distance near 1), and its loss sends gradient to that head's factors (and
# embedding/norm copies) only: exactly zero elsewhere. Each head therefore learns from
# $B/N$ sequences per update, which is why the file's docstring warns that LTE needs more tokens.
#
# ## 2 · The merge
#
# Before merging, compare on 8 fixed validation windows: the evaluation function (main weights
# only), each head's training function (the same windows fed as chunk $h$), and a plain `GPT`
# loaded with the *average* of the heads' effective weights
# $\bar W = \frac1N\sum_h \big(W + s(B_hA_h - B_h'A_h')\big)$ and averaged replica copies, computed
# here head by head from the factors. Then call `lte.merge_heads` and compare again.

# %%
@torch.no_grad()
def eval_loss():
    model.eval()
    out = F.cross_entropy(model(vx)[0].flatten(0, 1), vy.flatten()).item()
    model.train()
    return out


@torch.no_grad()
def head_losses():
    """Head h's training function on the validation windows: the windows fed as chunk h."""
    model.train()
    lg = model(vx.repeat(HEADS, 1))[0].view(HEADS, *vx.shape, -1)
    return [F.cross_entropy(lg[h].flatten(0, 1), vy.flatten()).item() for h in range(HEADS)]


@torch.no_grad()
def averaged_model():
    sd = lte.export(model, cfg)  # a plain GPT's keys: the main weights
    for name, m in lte_linears:
        eff = [m.weight + m.scaling * (m.lora_B[h] @ m.lora_A[h] - m.prev_B[h] @ m.prev_A[h]) for h in range(HEADS)]
        sd[name + ".weight"] = torch.stack(eff).mean(0)
    for name, m in replicas:
        sd[name + ".weight"] = m.heads.mean(0)
    plain = GPT(model.config)
    plain.load_state_dict(sd)
    return plain.eval()


@torch.no_grad()
def plain_loss(plain):
    return F.cross_entropy(plain(vx)[0].flatten(0, 1), vy.flatten()).item()


@torch.no_grad()
def eval_logits():
    model.eval()
    out = model(vx)[0]
    model.train()
    return out


avg = averaged_model()
before = {"eval": eval_loss(), "heads": head_losses(), "avg": plain_loss(avg)}
with torch.no_grad():
    logits_avg = avg(vx)[0]
W_before = layer.weight.clone()
info = lte.merge_heads(model, opt, cfg, tc, step=5)
after = {"eval": eval_loss(), "heads": head_losses()}
with torch.no_grad():
    model.train()
    lg = model(vx.repeat(HEADS, 1))[0].view(HEADS, *vx.shape, -1)
    ev = eval_logits()
    head_vs_eval = max((lg[h] - ev).abs().max().item() for h in range(HEADS))
ev_avg = (ev - logits_avg).abs().max().item()
lte.merge_heads(model, opt, cfg, tc, step=6)  # a second merge right after the first
again = (eval_logits() - ev).abs().max().item()

print(f"                     eval (W only)   heads' own functions            averaged plain GPT")
print(f"before the merge     {before['eval']:.4f}          {' '.join(f'{v:.4f}' for v in before['heads'])}   {before['avg']:.4f}")
print(f"after the merge      {after['eval']:.4f}          {' '.join(f'{v:.4f}' for v in after['heads'])}")
print(f"merge_rel_update |dW|/|W| = {info['merge_rel_update']:.2e}; up_proj moved by max |dW| = "
      f"{(layer.weight - W_before).abs().max():.2e}")
print(f"max |eval logits after merge - averaged plain GPT logits| = {ev_avg:.1e}")
print(f"max |head h's logits - eval logits| after the merge       = {head_vs_eval:.1e}")
print(f"max |eval logits change| from a second merge right after  = {again:.1e}")

# %% [markdown]
# What a merge does, as computed above:
# - it **moves** the evaluation function: the main weights absorb the heads' averaged progress, so
#   the eval loss changes at a merge (first column);
# - the function it moves to is the **averaged model** (the plain GPT built from the mean of the
#   heads' effective weights), to float32 rounding (logits agree to ~1e-6): the merge preserves the
#   mean of the heads' weights, not any one head's function, and the averaged model need not be
#   as good as the heads (compare its loss with theirs);
# - right after it every head computes the evaluation function again, and a second merge changes
#   nothing beyond float32 rounding.
#
# Between merges it is the other way round: the heads train, the evaluation function cannot move
# (W and the merged copies are not trained). A short run with `lte.after_step` merging every
# $T = 5$ updates shows the staircase.

# %%
T_STAIR, STEPS_STAIR = (2, 6) if FAST else (5, 30)
cfg.merge_iter = T_STAIR
curve = {"step": [], "eval": [], "heads": []}
for step in range(10, 10 + STEPS_STAIR):
    train_steps(1, step0=step, merge=True)  # after_step merges when (step + 1) % T == 0
    curve["step"].append(step + 1)
    curve["eval"].append(eval_loss())
    curve["heads"].append(head_losses())
ev_c, hd_c = np.array(curve["eval"]), np.array(curve["heads"])
merged = [(s % T_STAIR == 0) for s in curve["step"]]
between = max(abs(ev_c[i] - ev_c[i - 1]) for i in range(1, len(ev_c)) if not merged[i])
at = [abs(ev_c[i] - ev_c[i - 1]) for i in range(1, len(ev_c)) if merged[i]]

plt.figure(figsize=(6, 3.5))
for h in range(HEADS):
    plt.plot(curve["step"], hd_c[:, h], lw=0.8, alpha=0.7, label=f"head {h} (train mode)")
plt.step(curve["step"], ev_c, "k", where="post", lw=2, label="evaluation (W only)")
for s in curve["step"]:
    if s % T_STAIR == 0:
        plt.axvline(s, color="gray", lw=0.5, ls=":")
plt.xlabel("update (dotted: merges)"), plt.ylabel("loss on 8 val windows")
plt.title(f"the evaluation function moves only at merges (T = {T_STAIR})")
plt.legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
print(f"largest eval-loss change between merges: {between:.1e}; at merges: {min(at):.1e} ... {max(at):.1e}")
print("eval loss right after each merge:", " ".join(f"{v:.3f}" for v, m in zip(ev_c, merged) if m))

# %% [markdown]
# In the full setting the evaluation loss right after the six merges reads 3.42, 3.45, 3.41, 3.38,
# 3.36, 3.34: mostly down, but the merge at update 20 raised it. Averaging the heads is not
# guaranteed to help, and the heads' own losses (2 sequences each per update here) are much noisier
# than the staircase.
#
# ## 3 · Loss against the number of heads and the merge interval
#
# Short `train.main` runs on `tiny`, the built-in text, batch 16 sequences of 32 tokens, the file's
# defaults otherwise (printed at the top, usual `--lr`), and full-rank training on the same
# batches for reference. $N$ varies at $T = 10$; $T$ varies at $N = 4$. The grid is small to stay
# near a CPU-minute; with `FAST` it is a single LTE point.

# %%
STEPS = 8 if FAST else 100
N0, T0 = (2, 4) if FAST else (4, 10)
HEAD_GRID = [N0] if FAST else [1, 2, 4]
MERGE_GRID = [T0] if FAST else [1, 10, 50]
COMMON = ["--max_length", "32", "--batch_size", "16", "--num_training_steps", str(STEPS),
          "--warmup_steps", str(max(1, STEPS // 10)), "--eval_every", str(STEPS // 2 if FAST else STEPS // 5),
          "--eval_tokens", str(2048 if FAST else 8192), "--log_every", str(max(1, STEPS // 20)),
          "--sample_tokens", "0", "--data_dir", DATA_DIR]


def run(name, *args):
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        out = train.main(list(args) + COMMON + ["--save_dir", os.path.join(OUT, name)])
    out["summary"]["seconds"] = time.time() - t0
    return out


runs = {"full": run("full", "--method", "full")}
for N, T in sorted({(n, T0) for n in HEAD_GRID} | {(N0, t) for t in MERGE_GRID}):
    runs[(N, T)] = run(f"lte_N{N}_T{T}", "--method", "lte", "--num_heads", str(N), "--merge_iter", str(T))

print(f"{'run':>14s} {'val loss':>9s} {'train loss':>11s} {'merges':>7s} {'seconds':>8s}")
for k, o in runs.items():
    s = o["summary"]
    n_merge = sum("method/merge_rel_update" in r for r in o["metrics"])
    name = k if k == "full" else f"N={k[0]} T={k[1]}"
    print(f"{name:>14s} {s['val_loss']:9.4f} {s['train_loss']:11.4f} {n_merge:7d} {s['seconds']:8.1f}")

# %%
def val_curve(o):
    rows = [r for r in o["metrics"] if "val_loss" in r]
    return [r["step"] for r in rows], [r["val_loss"] for r in rows]


full_val = runs["full"]["summary"]["val_loss"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
for k, o in runs.items():
    axes[0].plot(*val_curve(o), "o-", ms=3, color="k" if k == "full" else None,
                 label=k if k == "full" else f"N={k[0]} T={k[1]}")
axes[0].set(xlabel="update", ylabel="validation loss", title="curves (same batches)")
axes[0].legend(fontsize=7)
axes[1].plot(HEAD_GRID, [runs[(n, T0)]["summary"]["val_loss"] for n in HEAD_GRID], "o-")
axes[1].axhline(full_val, color="k", ls="--", lw=1, label="full rank")
axes[1].set(xlabel="heads N (batch chunk per head = 16/N)", ylabel="final val loss", title=f"against N (T = {T0})",
            xticks=HEAD_GRID)
axes[2].plot(MERGE_GRID, [runs[(N0, t)]["summary"]["val_loss"] for t in MERGE_GRID], "o-")
axes[2].axhline(full_val, color="k", ls="--", lw=1, label="full rank")
axes[2].set(xlabel="merge interval T", title=f"against T (N = {N0})", xticks=MERGE_GRID)
if len(MERGE_GRID) > 1:
    axes[2].set_xscale("log"), axes[2].set_xticks(MERGE_GRID, [str(t) for t in MERGE_GRID])
for ax in axes[1:]:
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# In the committed full-setting run (tiny model, 100 updates of 512 tokens, one seed, so
# differences below ~0.1 are within noise):
# - **merge interval** matters most: $T = 1, 10, 50$ give about 2.81, 2.93, 3.12 against
#   full-rank's 2.69. Merging every update ($N = 4$) comes closest; at $T = 50$ the evaluation
#   model changes only twice (the flat start of its curve is the staircase of section 2);
# - **number of heads** at $T = 10$ moves the loss by about 0.15 and not monotonically
#   ($N = 1, 2, 4$: about 2.79, 2.95, 2.93) although each head sees $16/N$ sequences per update;
# - LTE steps cost more CPU time than full-rank steps here (the seconds column): $N$ heads of
#   factors, their prev copies and the replicas all run on every token.
#
# ## 4 · Bytes communicated per update
#
# `lte.comm_bytes_per_step(model, cfg)` counts the float32 payload that would be all-reduced per
# update, per rank, against full-rank DDP (every gradient, every update):
# - `--mode ddp` (the original): every trainable tensor (all $N$ heads' factors and the replicas)
#   every update;
# - `--mode local`, reset-less: at each merge one $m\times n$ update per layer, the $N$ heads'
#   factors (averaged over ranks so they agree) and the replicas' merged copy, divided by $T$;
# - `--mode local --reset_lora`: the same without the factors (fresh heads agree by construction).
#
# These are counts, not measurements, so big presets need no training: the models are built on
# PyTorch's `meta` device (shapes only, no memory) and wrapped once each; the function is then
# asked about each mode through a copy of the config (it reads only shapes and the config).
# Vocabulary: 257 bytes for `tiny`, GPT-2's 50257 for the `llama_*` presets (`--tokenizer gpt2`).

# %%
PRESETS = ["tiny", "llama_60m"] if FAST else ["tiny", "llama_60m", "llama_130m", "llama_1b"]
N_C, R_C, T_C = 4, 32, 10  # the file's defaults
comm, plain_params = {}, {}
for name in PRESETS:
    with torch.device("meta"):
        m = GPT(get_config(name, vocab_size=257 if name == "tiny" else 50257))
    plain_params[name] = sum(p.numel() for p in m.parameters())
    base_cfg = lte.Config(num_heads=N_C, lora_r=R_C, merge_iter=T_C, mode="local")
    lte.wrap(m, base_cfg, train.TrainConfig(batch_size=16))
    comm[name] = {
        "full-rank DDP": lte.comm_bytes_per_step(m, base_cfg)["full_ddp"],
        "lte --mode ddp": lte.comm_bytes_per_step(m, dataclasses.replace(base_cfg, mode="ddp"))["lte"],
        "lte local": lte.comm_bytes_per_step(m, base_cfg)["lte"],
        "lte local, reset": lte.comm_bytes_per_step(m, dataclasses.replace(base_cfg, reset_lora=True))["lte"],
    }
kinds = list(comm[PRESETS[0]])
fig, ax = plt.subplots(figsize=(7, 3.6))
w = 0.8 / len(kinds)
for i, k in enumerate(kinds):
    ax.bar(np.arange(len(PRESETS)) + (i - (len(kinds) - 1) / 2) * w, [comm[p][k] / 2**20 for p in PRESETS], w, label=k)
ax.set_xticks(range(len(PRESETS)), [f"{p}\n{plain_params[p] / 1e6:.1f}M" for p in PRESETS])
ax.set(yscale="log", ylabel="MiB per update per rank (float32)",
       title=f"all-reduce payload, N = {N_C} heads, r = {R_C}, T = {T_C}")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
print(f"{'preset':>11s} " + " ".join(f"{k:>17s}" for k in kinds) + "   local/full  reset/full  ddp/full")
for p in PRESETS:
    c = comm[p]
    print(f"{p:>11s} " + " ".join(f"{c[k] / 2**20:14.2f} MiB" for k in kinds)
          + f"   {c['lte local'] / c['full-rank DDP']:10.3f}  {c['lte local, reset'] / c['full-rank DDP']:10.3f}"
          + f"  {c['lte --mode ddp'] / c['full-rank DDP']:8.2f}")

# %% [markdown]
# From the table (full setting):
# - local mode with `--reset_lora` sends exactly $1/T$ of full-rank DDP (0.100 on every preset):
#   per merge, one $m\times n$ update per layer plus the replicas' merged copy, i.e. the plain model;
# - reset-less local mode also sends the $N$ heads' factors: 0.25 of full-rank on `tiny`, 0.11-0.12
#   on the `llama_*` presets;
# - the original `--mode ddp` all-reduces every head's gradient (and every embedding replica) every
#   update: more than full-rank DDP on `tiny`, `llama_60m` and `llama_130m` (1.66x, 1.56x, 1.13x),
#   less only on `llama_1b` (0.38x). Only local mode realises LTE's saving.
#
# How the local-mode payload grows with the number of heads (reset-less: $N$ heads' factors per
# merge) on the smallest preset: linearly in $N$, past full-rank DDP at the paper's $N = 32$ on
# `tiny` (1.31x below), while the reset variant does not depend on $N$:

# %%
name = "tiny"
HEAD_SWEEP = [1, 4] if FAST else [1, 4, 16, 32]
local_by_n = []
for n in HEAD_SWEEP:
    with torch.device("meta"):
        m = GPT(get_config(name, vocab_size=257))
    c = lte.Config(num_heads=n, lora_r=R_C, merge_iter=T_C, mode="local")
    lte.wrap(m, c, train.TrainConfig(batch_size=32))
    local_by_n.append((lte.comm_bytes_per_step(m, c)["lte"], lte.comm_bytes_per_step(m, c)["full_ddp"],
                       lte.comm_bytes_per_step(m, dataclasses.replace(c, reset_lora=True))["lte"]))
plt.figure(figsize=(6, 3.3))
plt.plot(HEAD_SWEEP, [a / 2**20 for a, _, _ in local_by_n], "o-", label="lte local (reset-less)")
plt.plot(HEAD_SWEEP, [c / 2**20 for _, _, c in local_by_n], "s-", label="lte local, reset")
plt.axhline(local_by_n[0][1] / 2**20, color="k", ls="--", lw=1, label="full-rank DDP")
plt.xscale("log", base=2), plt.xticks(HEAD_SWEEP, [str(n) for n in HEAD_SWEEP])
plt.xlabel("heads N"), plt.ylabel("MiB per update"), plt.title(f"{name}, r = {R_C}, T = {T_C}")
plt.legend(fontsize=7)
plt.tight_layout()
plt.show()
for n, (a, f, c) in zip(HEAD_SWEEP, local_by_n):
    print(f"N={n:3d}: reset-less {a / 2**20:6.2f} MiB ({a / f:.2f} of full DDP), reset {c / 2**20:.2f} MiB")

# %% [markdown]
# ## 5 · Memory at scale, and what stays float32
#
# LTE adds memory by design: every linear carries $N$ heads of factors ($N r (m+n)$ numbers, at
# least $2mn$ once $N r \ge \max(m, n)$, the paper's heuristic), their gradients and Adam moments,
# the prev factors, and $N$ copies of the embedding. `memory.estimate` runs train.py's own build and
# two updates (the second ends with a merge: `lte.EVENT_EVERY_UPDATE`) on fake tensors and reports
# the peak of one update on a GPU, split by kind. Full-rank and two LTE settings at the same batch:
# $N = 4$ heads of rank 64 at batch 4, and the paper's $N = 32$ at batch 32 (one sequence per head).
# `llama_350m` here (the file's docstring has `llama_1b` and `llama_7b`); with `FAST`, `tiny` at batch 4.

# %%
import memory

MEM_PRESET, VOCAB = ("tiny", 257) if FAST else ("llama_350m", 32000)
settings = {"full, batch 4": ("full", 4, []), "lte N=4 r=64, batch 4": ("lte", 4, ["--num_heads", "4", "--lora_r", "64"]),
            "full, batch 32": ("full", 32, []), "lte N=32 r=64, batch 32": ("lte", 32, ["--num_heads", "32", "--lora_r", "64"])}
if FAST:
    settings = dict(list(settings.items())[:2])
est = {}
for label, (method, batch, extra) in settings.items():
    est[label] = memory.estimate(["--method", method, "--model_config", MEM_PRESET, "--batch_size", str(batch),
                                  "--max_length", "256"] + extra, vocab_size=VOCAB)
kinds = ["weights", "optimizer", "activation", "grad", "temp"]
fig, ax = plt.subplots(figsize=(7.5, 3.4))
left = np.zeros(len(est))
for k in kinds:
    vals = np.array([r[k + "_bytes"] / 2**30 for r in est.values()])
    ax.barh(range(len(est)), vals, left=left, label=k)
    left += vals
ax.set_yticks(range(len(est)), list(est)), ax.invert_yaxis()
ax.set(xlabel="GiB at the peak (estimated, float32 storage, bf16 autocast)", title=f"{MEM_PRESET}: peak of one update")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
for label, r in est.items():
    print(f"{label:>24s}: peak {r['peak_bytes'] / 2**30:6.2f} GiB in {r['peak_phase']:>9s}; trainable {r['trainable_params'] / 1e6:7.0f}M"
          + "".join(f" | {k} {r[k + '_bytes'] / 2**30:.2f}" for k in kinds))

# %% [markdown]
# At $N = 4$ the heads are cheap and the peak sits near full-rank's (1.1x here; below it at
# `llama_1b` and `llama_7b`, where W's own gradient and moments weigh more); at the paper's
# $N = 32$ the factors, the prev factors, the 32 embedding copies and their Adam moments outweigh
# the model itself (2.5x), and the activations grow too: under autocast every layer keeps a bf16 copy of its
# $[A; A']$ and $[B, -B']$ for the backward. `--reset_lora` drops the prev factors and
# `--non_linear shared` the embedding copies.
#
# Under `--storage_dtype bfloat16` W and the embedding copies are stored in bf16, but the factors stay
# float32. The reason in one cell: a factor entry is about $1/\sqrt{r}$, and the paper trains with
# 0.05-0.1x the usual LR, so an Adam step (about `lr` per entry) is below half a bf16 ulp of most
# entries: in bf16 only the smallest entries of $A$ would move at all.

# %%
A0 = lte.semi_orthogonal(4, 32, 128, torch.Generator().manual_seed(0)).float()  # 4 heads, r 32, n 128
step = 1e-4 * torch.randn(A0.shape, generator=torch.Generator().manual_seed(1)).sign()  # one Adam step at lr 1e-4
for dt in (torch.float32, torch.bfloat16):
    A = A0.to(dt)
    moved = ((A + step.to(dt)) != A).float().mean().item()
    print(f"{str(dt):>15s}: |A| median {A0.abs().median():.3f}; entries that move under a 1e-4 step: {100 * moved:5.1f}%")
print(f"notebook run time {time.time() - T_START:.0f}s (FAST={FAST})")

# %% [markdown]
# ## What to try next
# - The paper's scale of heads: `python train.py --method lte --num_heads 32 --lora_r 32 --lora_alpha 4096
#   --lr 3e-4 --batch_size 64` (the paper pairs $s=128$ with a 0.05-0.1x learning rate).
# - `--reset_lora` against the reset-less default at equal tokens, and `--mode mhlora` (every head
#   on the whole batch, summed, no merges) as the sanity check.
# - Real workers: `torchrun --nproc-per-node 2 train.py --method lte --mode local --check_ranks_every 10`,
#   reading `method/comm_MB` in `metrics.jsonl`.
# - `--non_linear shared` or `frozen` to drop the $N$ embedding replicas on a large vocabulary.
# - Memory at your scale: `python memory.py --methods full,lte --model_config llama_1b --batch_size 32
#   --method_args "lte=--num_heads 32 --lora_r 64 --reset_lora --non_linear shared"` (add `--storage_dtype bfloat16`).
