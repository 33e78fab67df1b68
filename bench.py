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

LR sweep (--lrs, --seeds): every method at every LR and seed, resumable; see sweep.py.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from runfiles import machine  # noqa: E402

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
        import sweep
        return sweep.run_sweep(args, argv, methods, common, extra)
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


if __name__ == "__main__":
    sys.exit(main())
