# %% [markdown]
# # 00 · Every method side by side
#
# One model (`tiny`), one data stream (the built-in corpus), one seed, one token budget: every
# method of this repo trained through `bench.py`, which runs each in its own process and measures
# everything against `full` from the same invocation. Each method runs with the defaults of its
# file (chosen for `tiny`; the paper defaults are in each file's docstring).
#
# What to look for:
# - **memory**: what is stored for weights, gradients and optimizer state, per method;
# - **step time**: the price of adapters, switches, projections and quantization on a CPU;
# - **loss**: 80 updates at default learning rates say little; the last section reads the committed
#   LR sweep (every method at its best LR, 1,000 updates, two seeds), the comparison to trust.
#
# These are CPU numbers on a byte-level 0.9M-parameter model: they do not compare with the papers'
# tables (C4, T5 tokenizer, 60M-7B parameters). Set `FAST = False` for the full setting.

# %%
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(".."))
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import bench
import train

FAST = os.environ.get("FAST") == "1"  # the tests run every notebook with FAST=1 (seconds)
STEPS = 10 if FAST else 80
METHODS = [m for m in ["full", "relora", "switchlora", "golore", "lte", "loqt"] if m in train.available_methods()]
OUT = tempfile.mkdtemp(prefix="compare_")
print("methods:", METHODS, "| updates:", STEPS)

# %%
os.environ["OMP_NUM_THREADS"] = "1"  # one thread per run: tiny matrices gain nothing from more on a CPU
args = ["--methods", ",".join(METHODS), "--out", OUT, "--num_training_steps", str(STEPS),
        "--eval_every", str(max(1, STEPS // 5)), "--warmup_steps", str(max(1, STEPS // 10)),
        "--sample_tokens", "0", "--data_dir", os.path.abspath("../data_cache"),
        # ReLoRA's jagged cosine needs the run to be a whole number of restart periods: two here
        "--method_args", f"relora=--relora {STEPS // 2} --restart_warmup_steps {max(1, STEPS // 20)}"]
if FAST:  # seconds: short windows, small batches, a small validation set, one short timing round
    args += ["--max_length", "32", "--batch_size", "4", "--eval_tokens", "1024", "--timing_rounds", "1", "--timing_steps", "2"]
assert bench.main(args) == 0

# %% [markdown]
# ## The table
# `step ms` is the median over interleaved timing windows (every method built in one process and
# timed in turn, round after round, so a change of load hits all alike), with the spread of the
# windows; `step time vs full` is the ratio of medians. `val loss vs full` is the ratio of final
# validation losses at the same number of tokens.

# %%
display(Markdown(open(os.path.join(OUT, "bench.md")).read()))

# %%
results = json.load(open(os.path.join(OUT, "bench.json")))


def curve(method, key):
    rows = [json.loads(line) for line in open(os.path.join(OUT, method, "metrics.jsonl"))]
    return [r["tokens"] for r in rows if key in r], [r[key] for r in rows if key in r]


fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for m in METHODS:
    axes[0].plot(*curve(m, "val_loss"), "o-", ms=3, label=m)
axes[0].set(xlabel="tokens", ylabel="validation loss", title="loss at equal tokens")
axes[0].legend(fontsize=8)
names = list(results)
bottom = [0.0] * len(names)
for key, label in (("param_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_state_bytes", "optimizer")):
    vals = [results[m][key] / 2**20 for m in names]
    axes[1].bar(names, vals, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, vals)]
axes[1].set(ylabel="MiB", title="stored state")
axes[1].legend(fontsize=8)
axes[1].tick_params(axis="x", rotation=30)
axes[2].bar(names, [results[m]["step_s"] / results["full"]["step_s"] for m in names], color="gray")
axes[2].axhline(1.0, color="k", lw=0.8)
axes[2].set(ylabel="step time / full", title="speed (CPU)")
axes[2].tick_params(axis="x", rotation=30)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Memory at the papers' sizes
# The stored bytes above are for a 0.9M-parameter model. What a method saves shows at scale, so
# `memory.py` (also `python bench.py --memory`) runs train.py's own build and two training updates
# of each method, the second with its periodic event, on fake tensors: shapes and dtypes only,
# nothing allocated, so llama_7b takes seconds on a CPU. Below: the peak of each method's most
# expensive update at the papers' ranks, bf16 storage, one sequence of 256 tokens. FAST mode
# estimates `tiny`; the full setting shows the committed sweep behind the README table
# (docs/memory_bf16/memory.md, made by the command printed at its top).

# %%
import memory

if FAST:
    mem_out = os.path.join(OUT, "memory")
    memory.main(["--methods", ",".join(METHODS), "--model_config", "tiny", "--ranks", "paper", "--vocab_size", "257",
                 "--storage_dtype", "bfloat16", "--out", mem_out, "--method_args", "lte=--batch_size 4 --lora_r 32"])
    display(Markdown(open(os.path.join(mem_out, "memory.md")).read()))
else:
    display(Markdown(open(os.path.abspath("../docs/memory_bf16/memory.md")).read()))
    from IPython.display import Image
    display(Image(os.path.abspath("../docs/memory_bf16/memory.png")))

# %% [markdown]
# ## Loss, tuned: every method at its best learning rate
# A loss comparison at one learning rate favours whichever method that LR happens to suit. The
# committed sweep in `docs/sweep_tiny/` runs every method at four learning rates and two seeds for
# 1,000 updates each (`python bench.py --lrs ...`: the command and how many of its 48 cells have
# finished are at the top of the table; each cell takes a few CPU-minutes, two run at a time). This
# notebook reads its `sweep.json`; it does not re-run it. SwitchLoRA's best was at the grid's edge,
# so its curve continues with the cells of `docs/why_tiny/switchlora_lr` (0.016 to 0.128).

# %%
sweep_dir = os.path.abspath("../docs/sweep_tiny")
display(Markdown(open(os.path.join(sweep_dir, "sweep.md")).read()))
sweep = json.load(open(os.path.join(sweep_dir, "sweep.json")))
more = json.load(open(os.path.abspath("../docs/why_tiny/switchlora_lr/sweep.json")))["cells"]
cells = sweep["cells"] + [c for c in more if c["lr"] > max(sweep["lrs"])]
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for m in sweep["methods"]:
    by_lr = {}
    for c in cells:
        if c["method"] == m:
            by_lr.setdefault(c["lr"], []).append(c["val_loss"])
    lrs = sorted(by_lr)
    mean = [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
    lo = [mu - min(by_lr[lr]) for mu, lr in zip(mean, lrs)]
    hi = [max(by_lr[lr]) - mu for mu, lr in zip(mean, lrs)]
    ax.errorbar(lrs, mean, yerr=[lo, hi], fmt="o-", ms=3, capsize=2, label=m)
ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss after 1,000 updates",
       title="mean over seeds, bars: min-max")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Why ReLoRA and SwitchLoRA lead on `tiny`
# Tuned, ReLoRA and SwitchLoRA still end below full-rank. The runs in `docs/why_tiny/` (same
# 1,000 updates; each folder's `sweep.md` has its command) test the candidate causes one at a time:
# more seeds (is the lead real?), ReLoRA without its LoRA dropout and with a plain cosine (a
# regulariser, the schedule?), and full-rank with a **per-layer learning rate**
# (`--matrix_lr_ratio`: the blocks' matrices at a fraction of `--lr`, embeddings, head and norms at
# `--lr`). In ReLoRA and SwitchLoRA the embeddings, head and norms train at the method's own, larger
# LR while the blocks' matrices move only through the low-rank product; full-rank given the same
# split is the last rows.

# %%
rows = [("four_seeds_full", "full, lr 2e-3 (4 seeds)"), ("four_seeds_relora", "relora, lr 4e-3 (4 seeds)"),
        ("four_seeds_switchlora", "switchlora, lr 3.2e-2 (4 seeds)"),
        ("relora_no_dropout", "relora, --lora_dropout 0"), ("relora_plain_cosine", "relora, --scheduler cosine"),
        ("full_matrix_lr_half", "full, lr 4e-3, matrices x 1/2 (2e-3)"),
        ("full_matrix_lr_eighth", "full, lr 1.6e-2, matrices x 1/8 (2e-3)")]
table = ["| run | val loss (mean) | seeds (min-max) | train loss |", "|---|---|---|---|"]
for folder, label in rows:
    path = os.path.abspath(f"../docs/why_tiny/{folder}/sweep.json")
    if os.path.exists(path):
        runs = json.load(open(path))["cells"]
        v, t = [c["val_loss"] for c in runs], [c["train_loss_tail"] for c in runs]
        table.append(f"| {label} | {sum(v) / len(v):.4f} | {min(v):.4f}-{max(v):.4f} | {sum(t) / len(t):.4f} |")
display(Markdown("\n".join(table)))

# %% [markdown]
# ## What to try next
# - Raise `STEPS` (and `--num_training_steps`) to see whether the gaps close with more tokens.
# - Give a method its paper settings through `bench.py --method_args "relora=--lora_r 64 --relora 100"`.
# - On a GPU: `python bench.py --model_config llama_60m --dtype bfloat16 --num_training_steps 500`.
