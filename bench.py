"""
Several methods side by side: one model, one data stream, one seed, one invocation.

    python bench.py --methods full,relora,switchlora,golore,lte,loqt --model_config tiny --num_training_steps 300
    python bench.py --methods full,relora --method_args "relora=--relora 100 --lora_r 32"

Every other flag goes to train.py unchanged. Each method runs in its own process (so peak memory
is its own), writes its usual outputs under --out/<method>, and the comparison lands in
--out/bench.md (Markdown table), bench.json, bench_loss.png and bench_memory.png. Ratios are
against `full` measured in the same invocation; put `full` in --methods to get them.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RANK_KEYS = ("lora_r", "lora_rank", "rank", "r")  # the first one a method's config has is shown as its rank


def run_method(method, common, extra, out):
    save_dir = os.path.join(out, method)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--method", method, "--save_dir", save_dir] + common + extra
    print(f"== {method}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        return None
    with open(os.path.join(save_dir, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(save_dir, "config.json")) as fh:
        config = json.load(fh)
    mcfg = config["method"]
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh if line.strip()]
    summary["rank"] = next((mcfg[k] for k in RANK_KEYS if k in mcfg), "-")
    summary["lr"] = config["train"]["lr"]
    summary["command"] = " ".join(["python train.py"] + [shlex.quote(c) for c in cmd[2:]])
    return {"summary": summary, "metrics": metrics}


def mib(n):
    return f"{n / 2**20:.2f}"


def table(results):
    base = results.get("full", {}).get("summary")
    head = ("| method | rank | lr | trainable / total | weights MiB | grads MiB | optimizer MiB | peak MiB "
            "| tok/s | step time vs full | val loss | val loss vs full |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, r in results.items():
        s = r["summary"]
        rt = f"{base['tokens_per_sec'] / s['tokens_per_sec']:.2f}x" if base else "-"
        rv = f"{s['val_loss'] / base['val_loss']:.3f}" if base else "-"
        rows.append(f"| {m} | {s['rank']} | {s['lr']:g} | {s['trainable_params'] / 1e6:.3f}M / {s['total_params'] / 1e6:.3f}M "
                    f"| {mib(s['param_bytes'])} | {mib(s['grad_bytes'])} | {mib(s['optimizer_state_bytes'])} "
                    f"| {mib(s['peak_memory_bytes'])} | {s['tokens_per_sec']:,.0f} | {rt} | {s['val_loss']:.4f} | {rv} |")
    return "\n".join(rows)


def plots(results, out):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for m, r in results.items():
        va = [(x["tokens"], x["val_loss"]) for x in r["metrics"] if "val_loss" in x]
        if va:
            ax.plot(*zip(*va), "o-", ms=3, label=m)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,relora,switchlora,golore,lte,loqt")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--method_args", action="append", default=[], help='"method=--flag value ..." (repeatable)')
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
    t0, results = time.time(), {}
    for m in methods:
        r = run_method(m, common, extra.get(m, []), args.out)
        if r is None:
            print(f"error: method {m} failed; see above", file=sys.stderr)
            return 2
        results[m] = r
    md = (f"Command: `python bench.py {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`  \n"
          f"Machine: {machine()}; {time.time() - t0:.0f}s in all.\n\n{table(results)}\n")
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump({m: r["summary"] for m, r in results.items()}, fh, indent=1)
    plots(results, args.out)
    print(md)
    return 0


def machine():
    import platform
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
