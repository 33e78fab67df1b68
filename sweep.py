"""
LR sweep, `bench.py --lrs ... --seeds ...`: every method at every learning rate and seed.

    python bench.py --lrs 1e-3,2e-3,4e-3,8e-3 --seeds 0,1 --num_training_steps 1000 --out sweep_out

Each cell is a train.py process of its own with one thread, --jobs at a time (2 on a 2-core
machine). A cell whose
summary.json says it finished is not run again, and an interrupted one continues from its
checkpoint, so a sweep stopped at any point picks up where it was; a cell recorded in
--out/sweep.json with the same flags counts as done too, so a committed sweep.json resumes without
its cells/ folder. The results are rewritten as each cell finishes: --out/sweep.json (every cell),
sweep.md (each method at its best LR, mean and spread over the seeds; the whole grid) and
sweep_lr.png (validation loss against LR per method). --jobs 0 only writes them.
"""

import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from runfiles import HERE, machine


def cell_dir(out, method, lr, seed):
    return os.path.join(out, "cells", method, f"lr{lr:g}_seed{seed}")


def cell_argv(method, lr, seed, common, extra):
    """train.py's flags for one cell (its --save_dir aside)."""
    return ["--method", method] + common + extra.get(method, []) + ["--lr", f"{lr:g}", "--seed", str(seed)]


def cell_result(save_dir, steps):
    """The cell's summary if it finished `steps` updates, else None. Adds `train_loss_tail`: the mean
    logged training loss over the last tenth of the updates (one batch's loss is too noisy to compare)."""
    try:
        with open(os.path.join(save_dir, "summary.json")) as fh:
            s = json.load(fh)
        with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
            logged = [r for r in map(json.loads, filter(str.strip, fh)) if "loss" in r and "step" in r]
    except (OSError, ValueError):
        return None
    tail = [r["loss"] for r in logged if r["step"] > 0.9 * steps]
    s["train_loss_tail"] = statistics.mean(tail) if tail else s.get("train_loss")
    return s if s.get("steps") == steps and not s.get("interrupted") else None


def recorded_cells(out):
    """{(method, lr, seed): cell} from an earlier --out/sweep.json: a committed sweep resumes without its cells/."""
    try:
        with open(os.path.join(out, "sweep.json")) as fh:
            return {(c["method"], c["lr"], c["seed"]): c for c in json.load(fh)["cells"]}
    except (OSError, ValueError, KeyError):
        return {}


def sweep(methods, lrs, seeds, common, extra, out, jobs, report):
    """Run the missing cells, `jobs` at a time, calling report(results) after each one.
    -> {(method, lr, seed): summary} (failed cells absent). A cell is done if its folder's summary.json
    says it finished, or if --out/sweep.json records it with the same train.py flags."""
    import train
    steps = {m: train.parse_args(["--method", m] + common + extra.get(m, []))[0].num_training_steps for m in methods}
    cells = [(m, lr, s) for s, lr, m in itertools.product(seeds, lrs, methods)]  # seed by seed: a cut sweep has whole seeds
    recorded = recorded_cells(out)
    results, todo = {}, []
    for m, lr, seed in cells:
        argv = cell_argv(m, lr, seed, common, extra)
        s = cell_result(cell_dir(out, m, lr, seed), steps[m])
        if s is None and recorded.get((m, lr, seed), {}).get("argv") == argv:
            s = recorded[(m, lr, seed)]
        if s is None:
            todo.append((m, lr, seed))
        else:
            results[(m, lr, seed)] = dict(s, argv=argv)
    print(f"sweep: {len(cells)} cells, {len(results)} done before, {len(todo)} to run, {jobs} at a time", flush=True)
    if jobs < 1:
        return results
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running, t0, finished = [], time.time(), 0
    while todo or running:
        while todo and len(running) < jobs:
            m, lr, seed = todo.pop(0)
            d = cell_dir(out, m, lr, seed)
            os.makedirs(d, exist_ok=True)
            cmd = [sys.executable, os.path.join(HERE, "train.py")] + cell_argv(m, lr, seed, common, extra) + ["--save_dir", d, "--autoresume"]
            log = open(os.path.join(d, "train.log"), "a")
            running.append(((m, lr, seed), subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            key, proc, log = item
            log.close()
            finished += 1
            s = cell_result(cell_dir(out, *key), steps[key[0]])
            left = len(todo) + len(running)
            eta = (time.time() - t0) / finished * left  # cells finish at the rate they have so far
            if s is None:
                print(f"   {key[0]} lr {key[1]:g} seed {key[2]}: FAILED (exit {proc.returncode}); "
                      f"see {os.path.join(cell_dir(out, *key), 'train.log')}", file=sys.stderr, flush=True)
            else:
                results[key] = dict(s, argv=cell_argv(*key, common, extra))
                report(results)
                print(f"   {key[0]} lr {key[1]:g} seed {key[2]}: val_loss {s['val_loss']:.4f} "
                      f"({s['train_time_s']:.0f}s) | {left} left, eta {eta:.0f}s", flush=True)
    return results


def sweep_summary(results, methods, lrs, seeds):
    """Per method and LR: mean, min and max over seeds of val and train loss. Best LR = lowest mean val loss."""
    grid = {}
    for m in methods:
        for lr in lrs:
            runs = [results[(m, lr, s)] for s in seeds if (m, lr, s) in results]
            if runs:
                v = [r["val_loss"] for r in runs]
                t = [r.get("train_loss_tail", r["train_loss"]) for r in runs]
                grid[(m, lr)] = {"val_mean": statistics.mean(v), "val_min": min(v), "val_max": max(v),
                                 "train_mean": statistics.mean(t), "seeds": len(runs)}
    best = {}
    for m in methods:
        cands = [(g["val_mean"], lr) for (mm, lr), g in grid.items() if mm == m]
        if cands:
            best[m] = min(cands)[1]
    return grid, best


def sweep_tables(grid, best, lrs):
    base = grid.get(("full", best["full"])) if "full" in best else None
    head = ("| method | best lr | val loss (mean) | over seeds (min-max) | train loss (last 10% of updates) "
            "| val - train | val vs full |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, lr in best.items():
        g = grid[(m, lr)]
        edge = " (edge of grid)" if lr in (min(lrs), max(lrs)) and len(lrs) > 1 else ""
        vs = f"{g['val_mean'] / base['val_mean']:.3f}" if base else "-"
        rows.append(f"| {m} | {lr:g}{edge} | {g['val_mean']:.4f} | {g['val_min']:.4f}-{g['val_max']:.4f} "
                    f"| {g['train_mean']:.4f} | {g['val_mean'] - g['train_mean']:+.4f} | {vs} |")
    head = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    rows += ["", "Validation loss, mean over seeds, at every LR (best in bold):", "", head, "|" + "---|" * (len(lrs) + 1)]
    for m in best:
        cells = []
        for lr in lrs:
            g = grid.get((m, lr))
            txt = "-" if g is None else f"{g['val_mean']:.4f}"
            cells.append(f"**{txt}**" if lr == best[m] else txt)
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_plot(grid, best, lrs, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for m in best:
        pts = [(lr, grid[(m, lr)]) for lr in lrs if (m, lr) in grid]
        x = [lr for lr, _ in pts]
        y = [g["val_mean"] for _, g in pts]
        err = [[g["val_mean"] - g["val_min"] for _, g in pts], [g["val_max"] - g["val_mean"] for _, g in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o-", ms=3, capsize=2, label=m)
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss (mean; bars: seed min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def run_sweep(args, argv, methods, common, extra):
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    seeds = [int(x) for x in (args.seeds or "0").split(",") if x.strip()]
    if "--lr" in common or "--seed" in common:
        print("error: --lrs/--seeds set the LR and seed of every cell; drop --lr and --seed", file=sys.stderr)
        return 2
    n_cells, train_tokens = len(methods) * len(lrs) * len(seeds), data_train_tokens(common)

    def report(results):
        """sweep.json (every finished cell), sweep.md (the tables) and sweep_lr.png, rewritten as cells finish."""
        grid, best = sweep_summary(results, methods, lrs, seeds)
        cell_s = sum(r.get("wall_time_s", r["train_time_s"]) for r in results.values())
        some = next(iter(results.values()), {})
        epochs = f", {some['tokens'] / train_tokens:.1f} epochs of the {train_tokens:,}-token training split" if some and train_tokens else ""
        shown = [a for i, a in enumerate(argv) if a != "--jobs" and (i == 0 or argv[i - 1] != "--jobs")]  # jobs: how, not what
        md = (f"Command: `python bench.py {' '.join(shlex.quote(a) for a in shown)}`  \n"
              f"Machine: {machine()}; one thread per cell; {cell_s / 3600:.2f} h of cell time in all.  \n"
              f"Each cell: {some.get('steps', '?')} updates, {some.get('tokens', 0):,} tokens{epochs}; "
              f"{len(results)} of {n_cells} cells finished.\n\n"
              f"{sweep_tables(grid, best, lrs) if best else '(no cell finished)'}\n")
        cells = [{"method": m, "lr": lr, "seed": s, **{k: r.get(k) for k in ("val_loss", "train_loss", "train_loss_tail", "steps", "tokens",
                  "train_time_s", "wall_time_s", "trainable_params", "argv")}} for (m, lr, s), r in sorted(results.items())]
        with open(os.path.join(args.out, "sweep.json"), "w") as fh:
            json.dump({"command": argv, "methods": methods, "lrs": lrs, "seeds": seeds, "best_lr": best, "cells": cells}, fh, indent=1)
        with open(os.path.join(args.out, "sweep.md"), "w") as fh:
            fh.write(md)
        if best:
            sweep_plot(grid, best, lrs, os.path.join(args.out, "sweep_lr.png"))
        return md

    try:
        results = sweep(methods, lrs, seeds, common, extra, args.out, args.jobs, report)
    except KeyboardInterrupt:  # the running cells got the Ctrl-C too: they checkpoint and stop
        print("\ninterrupted: finished cells are in sweep.json; the same command continues the sweep", file=sys.stderr)
        return 130
    print(report(results))
    return 0 if len(results) == n_cells else 1


def data_train_tokens(common):
    """Tokens in the training split the cells read (from the shard folder's meta.json), or None."""
    import data as data_lib
    import train
    tc = train.parse_args(["--method", "full"] + common)[0]
    try:
        folder = data_lib.prepare(tc.dataset, tc.dataset_config, tc.tokenizer, tc.data_dir, tc.dataset_tokens,
                                  tc.val_fraction, log=lambda *a: None)
        with open(os.path.join(folder, "meta.json")) as fh:
            return json.load(fh)["train_tokens"]
    except Exception:  # a hub dataset offline: the epochs are left out, nothing else depends on it
        return None
