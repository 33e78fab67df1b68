"""
Several methods side by side: one model, one data stream, one seed, one invocation.

    python bench.py --methods full,relora,switchlora,golore,lte,loqt --model_config tiny --num_training_steps 300
    python bench.py --methods full,relora --method_args "relora=--relora 100 --lora_r 32"
    python bench.py --memory --model_config llama_7b          # peak memory at any preset (memory.py)
    python bench.py --lrs 1e-3,2e-3,4e-3,8e-3 --seeds 0,1 --num_training_steps 1000 --out sweep_out   # LR sweep

Every other flag goes to train.py unchanged. Each method trains in its own process (its progress
is shown as it goes), writes its usual outputs under --out/<method>, and the comparison lands in
--out/bench.md (Markdown table), bench.json, bench_loss.png and bench_memory.png. Ratios are
against `full` measured in the same invocation; put `full` in --methods to get them.

Step time. A step time read off one pass is at the mercy of whatever else the machine does. So
after training, all methods are built again in this one process (train.py's setup and build) and
timed in interleaved windows: round after round, each method runs --timing_steps updates in turn,
so a change of load hits every method alike. The table gives each method's median window and the
ratio of medians to full, with the spread (max/min window) beside it; when full's own windows
spread by more than 15% the ratios are flagged as noise. --timing_rounds 0 skips this and reports
the training runs' own tokens/s.

LR sweep (--lrs, --seeds). Every method at every learning rate and seed, each cell a train.py
process of its own with one thread, --jobs at a time (2 on a 2-core machine). A cell whose
summary.json says it finished is not run again, and an interrupted one continues from its
checkpoint, so a sweep stopped at any point picks up where it was; a cell recorded in
--out/sweep.json with the same flags counts as done too, so a committed sweep.json resumes without
its cells/ folder. The results are rewritten as each cell finishes: --out/sweep.json (every cell),
sweep.md (each method at its best LR, mean and spread over the seeds; the whole grid) and
sweep_lr.png (validation loss against LR per method). --jobs 0 only writes them.
"""

import argparse
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RANK_KEYS = ("lora_r", "lora_rank", "r")  # the first one a method's config has is shown as its rank
NOISY = 1.15  # full's slowest window / fastest window above this: the ratios mean little


def run_method(method, common, extra, out):
    """train.py in a subprocess; its step lines are echoed as progress (step, loss, ETA)."""
    save_dir = os.path.join(out, method)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--method", method, "--save_dir", save_dir] + common + extra
    print(f"== {method}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    import train
    total = train.parse_args(["--method", method] + common + extra)[0].num_training_steps
    tail, t0 = [], time.time()
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = re.match(r"step (\d+) \| (loss|val_loss) ([\d.naif]+)", line)
        if m:
            done = int(m.group(1))
            eta = f" | eta {(time.time() - t0) / done * (total - done):.0f}s" if m.group(2) == "loss" else ""
            print(f"   [{method}] step {done}/{total} | {m.group(2)} {m.group(3)}{eta}", flush=True)
    if proc.wait() != 0:
        print("".join(tail), file=sys.stderr)
        return None
    with open(os.path.join(save_dir, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(save_dir, "config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh if line.strip()]
    summary["rank"] = next((config["method"][k] for k in RANK_KEYS if k in config["method"]), "-")
    summary["lr"] = config["train"]["lr"]
    summary["command"] = " ".join(["python train.py"] + [shlex.quote(c) for c in cmd[2:]])
    return {"summary": summary, "metrics": metrics, "argv": ["--method", method] + common + extra}


def time_methods(results, rounds, steps, out):
    """Median step time per method over interleaved windows, all in this process. -> {method: [window s/step]}."""
    import torch

    import data as data_lib
    import train
    runs = {}
    for m, r in results.items():  # the same flags as the training run, outputs to a scratch folder
        tc, method, mc = train.parse_args(r["argv"] + ["--save_dir", os.path.join(out, "timing", m)])
        run = train.setup(tc, method, mc)
        train.check_geometry(tc)
        folder = data_lib.prepare(tc.dataset, tc.dataset_config, tc.tokenizer, tc.data_dir, tc.dataset_tokens,
                                  tc.val_fraction, log=lambda *a: None)
        run.data = data_lib.TokenData(folder, tc.max_length, tc.seed)
        runs[m] = train.build(run, run.data.vocab_size)
    windows = {m: [] for m in runs}
    for k in range(rounds + 1):  # round 0 warms up (allocator, caches) and is not counted
        for m, run in runs.items():
            sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for step in range(k * steps, (k + 1) * steps):
                loss, _, _ = train.train_step(run, step % run.tc.num_training_steps)
            loss.item()
            sync()
            if k:
                windows[m].append((time.perf_counter() - t0) / steps)
        print(f"   timing round {k}/{rounds}: " + ", ".join(f"{m} {1000 * w[-1]:.0f}ms" for m, w in windows.items() if w),
              flush=True)
    return windows


def mib(n):
    return f"{n / 2**20:.2f}"


def table(results):
    base = results.get("full", {}).get("summary")
    head = ("| method | rank | lr | trainable / total | weights MiB | grads MiB | optimizer MiB | peak MiB "
            "| step ms (spread) | step time vs full | val loss | val loss vs full |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, r in results.items():
        s = r["summary"]
        rt = f"{s['step_s'] / base['step_s']:.2f}x" if base else "-"
        rv = f"{s['val_loss'] / base['val_loss']:.3f}" if base else "-"
        rows.append(f"| {m} | {s['rank']} | {s['lr']:g} | {s['trainable_params'] / 1e6:.3f}M / {s['total_params'] / 1e6:.3f}M "
                    f"| {mib(s['param_bytes'])} | {mib(s['grad_bytes'])} | {mib(s['optimizer_state_bytes'])} "
                    f"| {mib(s['peak_memory_bytes'])} | {1000 * s['step_s']:.0f} ({s['spread']}) | {rt} "
                    f"| {s['val_loss']:.4f} | {rv} |")
    return "\n".join(rows)


def plots(results, out):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for m, r in results.items():
        va = [(x["tokens"], x["val_loss"]) for x in r["metrics"] if "val_loss" in x]
        if va:
            ax.plot(*zip(*va), "o-", ms=3, label=m)
    ax.set(xlabel="tokens", ylabel="validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench_loss.png"), dpi=80)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    names = list(results)
    bottom = [0.0] * len(names)
    for key, label in (("param_bytes", "weights"), ("grad_bytes", "gradients"), ("optimizer_state_bytes", "optimizer state")):
        vals = [results[m]["summary"][key] / 2**20 for m in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench_memory.png"), dpi=80)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--memory" in argv:  # peak memory at any preset, estimated on fake tensors
        import memory
        return memory.main([a for a in argv if a != "--memory"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,relora,switchlora,golore,lte,loqt")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--method_args", action="append", default=[], help='"method=--flag value ..." (repeatable)')
    p.add_argument("--timing_rounds", type=int, default=3, help="interleaved timing rounds after training (0: off)")
    p.add_argument("--timing_steps", type=int, default=10, help="updates per method per timing round")
    p.add_argument("--lrs", default=None, help="LR sweep: comma-separated learning rates (each method at each)")
    p.add_argument("--seeds", default=None, help="LR sweep: comma-separated seeds (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="LR sweep: cells run at once, one thread each (0: only the report)")
    args, common = p.parse_known_args(argv)
    extra = {}
    for item in args.method_args:
        name, _, flags = item.partition("=")
        extra[name.strip()] = shlex.split(flags)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    missing = [m for m in methods if not os.path.isfile(os.path.join(HERE, f"{m}.py"))]
    if missing:
        print(f"error: no method file for {', '.join(missing)}", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.lrs or args.seeds:
        return run_sweep(args, argv, methods, common, extra)
    t0, results = time.time(), {}
    for m in methods:
        r = run_method(m, common, extra.get(m, []), args.out)
        if r is None:
            print(f"error: method {m} failed; see above", file=sys.stderr)
            return 2
        results[m] = r
    windows = time_methods(results, args.timing_rounds, args.timing_steps, args.out) if args.timing_rounds > 0 else {}
    for m, r in results.items():
        s, w = r["summary"], windows.get(m)
        s["step_s"] = statistics.median(w) if w else s["train_time_s"] / max(1, s["steps"])
        s["spread"] = f"{max(w) / min(w):.2f}x" if w else "one pass"
        s["timing_windows_s"] = w
    note = ""
    if "full" in windows and max(windows["full"]) / min(windows["full"]) > NOISY:
        note = (f"\n**Noisy machine**: full-rank's own timing windows differ by "
                f"{max(windows['full']) / min(windows['full']):.2f}x, so the step-time ratios mean little.\n")
        print(note.strip(), file=sys.stderr)
    timing = (f"step time: median of {args.timing_rounds} interleaved windows of {args.timing_steps} updates per method"
              if windows else "step time: the training runs' own average (one pass, not interleaved)")
    md = (f"Command: `python bench.py {' '.join(shlex.quote(a) for a in argv)}`  \n"
          f"Machine: {machine()}; {time.time() - t0:.0f}s in all; {timing}.\n{note}\n{table(results)}\n")
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump({m: r["summary"] for m, r in results.items()}, fh, indent=1)
    plots(results, args.out)
    print(md)
    return 0


# ---------------------------------------------------------------------------------------------
# LR sweep: every (method, lr, seed) cell in its own one-thread process, --jobs at a time


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


def machine():
    import platform
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
