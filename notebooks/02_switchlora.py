# %% [markdown]
# # 02 · SwitchLoRA: swapping adapter vectors to reach full rank
#
# Zhou, Wang, Xu, *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information*
# (arXiv:2406.06564). This notebook imports `switchlora.py` and looks at its switch schedule, its
# candidate pools and the rank of the update it produces on the `tiny` model.
#
# Each adapted linear computes $y = Wx + s\,BAx$ with $W$ frozen, $A \in \mathbb{R}^{r\times n}$,
# $B \in \mathbb{R}^{m\times r}$ trainable and $s = \alpha/r = 1/r$. Plain LoRA's update $sBA$ has
# rank $\le r$. SwitchLoRA keeps per layer a pool of $N_c = \min(m, n)$ candidate rows for $A$ and
# columns for $B$, and at every step swaps a few active vectors for candidates, folding the
# difference into $W$ so that the function does not change:
#
# $$A_{i,:} \to C_A[c]:\quad W \leftarrow W + s\,B_{:,i}\,(A_{i,:} - C_A[c]),\qquad
#   B_{:,j} \to C_B[c]:\quad W \leftarrow W + s\,(B_{:,j} - C_B[c])\,A_{j,:}.$$
#
# The merged update $W_\text{eff} - W_{\text{eff},0}$ (with $W_\text{eff} = W + sBA$) can therefore
# reach a rank far above $r$. The number of vectors switched per step and factor is
# $r/\text{interval}(t)$ (stochastically rounded) with
#
# $$\text{interval}(t) = \frac{\text{interval}_0}{0.3^{(t+1)/D}},\qquad D = \text{descent\_rate}\times T,$$
#
# so switching slows down $3.33\times$ every $D$ steps. After a switch the *counterpart* vector
# (column $i$ of $B$ for row $i$ of $A$) is frozen for `adam_warm_step` steps and its Adam state is
# reset.
#
# Below: (1) the schedule from `switchlora.switch_interval`; (2) short runs of SwitchLoRA, plain LoRA
# (`--switch_lora false`, same init and optimizer) and full-rank training, recording one layer;
# (3) switches per step and candidate usage; (4) the rank of the update; (5) the loss.

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

import full
import switchlora
import train

%config InlineBackend.figure_format = 'png'
plt.rcParams["figure.dpi"] = 70
torch.set_num_threads(1)  # these notebooks are built on a shared 2-core CPU
T_START = time.time()

FAST = os.environ.get("FAST") == "1"  # the tests run every notebook with FAST=1 (seconds)
STEPS = 8 if FAST else 60
R = 32  # switchlora.py's default lora_rank
INTERVAL, DESCENT = 10, 0.3  # the file's defaults (40, 0.1) are for 500 steps; smallest allowed interval is 2 x adam_warm_step
LAYER = "layers.1.mlp.up_proj"  # (352 x 128): N_c = 128 candidates
OUT = tempfile.mkdtemp(prefix="switchlora_")
COMMON = ["--max_length", "64", "--batch_size", "8", "--num_training_steps", str(STEPS),
          "--warmup_steps", str(max(1, STEPS // 10)), "--eval_every", str(STEPS // 2 if FAST else STEPS // 4),
          "--eval_tokens", "1024" if FAST else "8192", "--log_every", "1", "--sample_tokens", "0",
          "--data_dir", os.path.abspath("../data_cache")]
print(f"{STEPS} updates, r={R}, interval_0={INTERVAL}, descent_rate={DESCENT}")

# %% [markdown]
# ## 1 · The switch schedule
# `switchlora.switch_interval(step, cfg, train)` is what `before_step` uses; the expected number of
# vectors switched per step and factor is $r/\text{interval}(t)$.

# %%
cfg = switchlora.Config(lora_rank=R, switch_lora_interval=INTERVAL, switch_lora_descent_rate=DESCENT)
tc = train.TrainConfig(num_training_steps=STEPS)
expected = np.array([R / switchlora.switch_interval(t, cfg, tc) for t in range(STEPS)])
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(expected, label="r / interval(t): expected switches per step")
ax.plot(np.cumsum(expected) / 10, label="cumulative / 10")
ax.set(xlabel="update t", ylabel="vectors per factor and layer", title=f"D = {DESCENT} x {STEPS} steps")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"expected switches per factor and layer over the run: {expected.sum():.1f} "
      f"(half of them by update {int(np.searchsorted(np.cumsum(expected), expected.sum() / 2))})")

# %% [markdown]
# ## 2 · Three runs, recording one layer
# A small wrapper records, after every update, the effective weight $W + sBA$ of `LAYER`, its
# switch counter and which candidates of its pool are checked out into $A$. It wraps the module's
# hooks (`before_step` for the starting point, an `after_step` for the snapshots) and calls the
# originals: nothing of the method is re-implemented. SwitchLoRA and LoRA run at the file's default
# LR (0.032, `TRAIN_DEFAULTS`); full-rank at train.py's 2e-3 (each the best on `tiny` in the README's
# LR sweep).

# %%
def run(name, args):
    t0, backend = time.time(), plt.get_backend()
    with contextlib.redirect_stdout(io.StringIO()):  # train.py prints every logged update
        res = train.main(["--save_dir", os.path.join(OUT, name)] + COMMON + args)
    plt.switch_backend(backend)  # train.py's loss.png switches matplotlib to Agg; back to inline
    s = res["summary"]
    print(f"{name:10s} val_loss {s['val_loss']:.4f} | trainable {s['trainable_params']:,} of {s['total_params']:,} "
          f"| {time.time() - t0:.0f}s")
    return res


@contextlib.contextmanager
def recording(module, layer):
    rec = {"W": [], "switched": [], "used_A": set()}
    orig_before, orig_after = getattr(module, "before_step", None), getattr(module, "after_step", None)

    def weight(model):
        m = model.get_submodule(layer)
        return (m.merged_weight() if isinstance(m, switchlora.SwitchLoRALinear) else m.weight).detach().double().clone()

    def before_step(step, model, opt, cfg, tc):
        if step == 0:
            rec["W0"] = weight(model)
            m = model.get_submodule(layer)
            if getattr(m, "switchable", False):
                rec["used_A"].update(m.selected_A.tolist())  # the r rows active at the start
        return orig_before(step, model, opt, cfg, tc) if orig_before else {}

    def after_step(step, model, opt, cfg, tc):
        out = orig_after(step, model, opt, cfg, tc) if orig_after else {}
        m = model.get_submodule(layer)
        rec["W"].append(weight(model))
        if getattr(m, "switchable", False):
            rec["switched"].append(m.n_switched)
            rec["used_A"].update(m.selected_A.tolist())
            rec.setdefault("n_used_A", []).append(len(rec["used_A"]))
        return out

    module.before_step, module.after_step = before_step, after_step
    try:
        yield rec
    finally:
        for name, orig in (("before_step", orig_before), ("after_step", orig_after)):
            if orig:
                setattr(module, name, orig)
            else:
                delattr(module, name)


sw_args = ["--method", "switchlora", "--lora_rank", str(R), "--switch_lora_interval", str(INTERVAL),
           "--switch_lora_descent_rate", str(DESCENT)]
results, recs = {}, {}
with recording(switchlora, LAYER) as rec:
    results["SwitchLoRA"] = run("switchlora", sw_args)
recs["SwitchLoRA"] = rec
with recording(switchlora, LAYER) as rec:
    results["LoRA"] = run("lora", sw_args + ["--switch_lora", "false"])
recs["LoRA"] = rec
with recording(full, LAYER) as rec:
    results["full"] = run("full", ["--method", "full"])
recs["full"] = rec

# %% [markdown]
# ## 3 · Switches per step and candidate usage
# Left: vectors switched per step in the recorded layer (one factor) against the schedule's
# expectation. Right: how many of the layer's $N_c$ candidate rows for $A$ have been active at some point.

# %%
sw = recs["SwitchLoRA"]
per_step = np.diff([0] + sw["switched"])
logged = [(r["step"] - 1, r["method/switched"]) for r in results["SwitchLoRA"]["metrics"] if "method/switched" in r]
layer_obj_nc = min(sw["W0"].shape)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
axes[0].bar(range(STEPS), per_step, color="C1", alpha=0.6, label=f"{LAYER} (per step)")
axes[0].plot(expected, "k-", lw=1, label="r / interval(t)")
axes[0].set(xlabel="update", ylabel="vectors switched", title="switches per step (one factor)")
axes[0].legend(fontsize=8)
axes[1].plot(range(STEPS), sw["n_used_A"], label="distinct candidates ever active in A")
axes[1].plot(range(STEPS), np.array(sw["switched"]) + R, "--", label="r + switched")
axes[1].axhline(layer_obj_nc, color="gray", ls=":", label=f"N_c = {layer_obj_nc}")
axes[1].set(xlabel="update", ylabel="count", title="candidate usage")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"{LAYER}: switched {sw['switched'][-1]} vectors per factor (expected {expected.sum():.1f}); "
      f"distinct candidates ever active in A: {len(sw['used_A'])} of N_c = {layer_obj_nc} (r = {R})")
print(f"method/switched at the end (all layers): {logged[-1][1]}")

# %% [markdown]
# ## 4 · The rank of the update
# For each run, the singular values of $\Delta = W_\text{eff} - W_{\text{eff},0}$ of `LAYER` (352×128,
# so rank $\le 128$). A switch keeps $W + sBA$ only up to float32 rounding, and that rounding is
# full-rank; the first update runs at LR 0 (warmup), so $\Delta$ after it is pure rounding and gives
# a noise floor. We count the singular values above $\max(10^{-3}\sigma_1,\ 10\times\text{floor})$
# and also report the entropy effective rank $\exp(-\sum_i p_i \log p_i)$, $p_i = \sigma_i / \sum_j \sigma_j$.

# %%
def spectrum(rec, t):
    return torch.linalg.svdvals(rec["W"][t] - rec["W0"]).numpy()


print("LR of the first update:", results["SwitchLoRA"]["metrics"][0]["lr"])
FLOOR = spectrum(recs["SwitchLoRA"], 0)[0]  # sigma_1 of the switches' rounding after update 0
print(f"noise floor (sigma_1 of Delta after update 0, SwitchLoRA): {FLOOR:.2e}; "
      f"LoRA: {spectrum(recs['LoRA'], 0)[0]:.2e}, full: {spectrum(recs['full'], 0)[0]:.2e}")


def ranks(sv):
    if sv[0] <= 10 * FLOOR:  # nothing above the rounding noise (e.g. after the LR-0 first update)
        return 0, 0.0
    p = sv / sv.sum()
    return int((sv > max(1e-3 * sv[0], 10 * FLOOR)).sum()), float(np.exp(-(p * np.log(p + 1e-300)).sum()))


fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
checkpoints = sorted(set(np.linspace(0, STEPS - 1, min(STEPS, 12)).astype(int)))
for i, name in enumerate(recs):
    hist = [ranks(spectrum(recs[name], t)) for t in checkpoints]
    axes[0].plot([t + 1 for t in checkpoints], [h[0] for h in hist], "o-", ms=3, color=f"C{i}", label=f"{name}: count")
    axes[0].plot([t + 1 for t in checkpoints], [h[1] for h in hist], "x--", ms=4, color=f"C{i}", label=f"{name}: entropy")
    sv = spectrum(recs[name], STEPS - 1)
    axes[1].semilogy(sv / sv[0], color=f"C{i}", label=name)
axes[0].axhline(R, color="gray", ls=":", lw=1)
axes[0].axhline(2 * R, color="gray", ls="--", lw=1)
axes[0].set(xlabel="update", ylabel="rank of W_eff - W_eff0", title=LAYER)
axes[0].legend(fontsize=7)
axes[1].axvline(2 * R, color="gray", ls="--", lw=1)
axes[1].set(xlabel="index", ylabel="σ_i / σ_1", title="final singular values", ylim=(1e-6, 2))
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
for name in recs:
    c, e = ranks(spectrum(recs[name], STEPS - 1))
    print(f"{name:10s} rank (count above the threshold) {c:3d} | entropy effective rank {e:6.1f}")

# %% [markdown]
# With SwitchLoRA's init both $A_0$ and $B_0$ are nonzero, so even plain LoRA's update
# $s(BA - B_0A_0)$ has rank up to $2r$ (dashed line; dotted: $r$), not $r$: the count shows LoRA
# sitting at that bound. Each switch folds a rank-one term into $W$, so SwitchLoRA's count can go
# beyond $2r$, by up to the number of switched vectors of both factors (section 3). Full-rank training
# updates all 128 directions. The entropy effective rank shows how evenly the update is spread.
#
# ## 5 · Loss against full-rank training

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for i, (name, res) in enumerate(results.items()):
    rows = [r for r in res["metrics"] if "loss" in r]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", lw=1, alpha=0.8, label=name)
    ev = [r for r in res["metrics"] if "val_loss" in r]
    ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o", color=f"C{i}", ms=4)
ax.set(xlabel="step", ylabel="loss (line: train, dots: val)", title=f"tiny, {STEPS} updates")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
for name, res in results.items():
    s = res["summary"]
    print(f"{name:10s} val_loss {s['val_loss']:.4f} | trainable params {s['trainable_params']:,} "
          f"| optimizer state {s['optimizer_state_bytes'] / 2**20:.2f} MiB")
print(f"notebook run time: {time.time() - T_START:.0f}s")

# %% [markdown]
# These are single short runs with one seed, at different learning rates (0.032 for the adapters,
# 2e-3 for full-rank, each file's default), so the loss gap is indicative only; the README's results
# section has the tuned, seeded comparison at 1,000 updates.
#
# ## What to try next
# - Run the file's defaults for 500 steps (`--switch_lora_interval 40 --switch_lora_descent_rate 0.1`)
#   and watch the rank keep growing while switching slows down.
# - `--discontinuous_switch` draws candidates at random instead of sliding a window: compare the
#   candidate usage.
# - `--remain_switch_state` / `--adam_warm_step 0`: how much do the counterpart resets matter for loss?
# - `--init_lora_type origin_lora` (Kaiming A, zero B) against the balanced SwitchLoRA init.
# - `--storage_dtype bfloat16`: W, the pools and the embeddings in bf16 as in the original code, but $A$
#   and $B$ kept in float32 (the file's docstring says why); each switch then rounds $W$ to bf16 once.
# - Memory at paper scale, on fake tensors in about a minute:
#   `python memory.py --methods full,switchlora --model_config llama_1b --method_args "switchlora=--lora_rank 256"`
#   (the docstring's table: about half of full-rank's peak at llama_1b, the pools on the host).
