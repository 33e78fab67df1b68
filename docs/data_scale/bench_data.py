"""
Token-shard preparation at the papers' scale: wall time, tokens/s and peak memory of `python data.py`.

    python docs/data_scale/bench_data.py --corpus_gb 4.5 --dataset_tokens 1_000_000_000 \
        --tokenizer r50k_base --num_proc 1,2 --out docs/data_scale

Writes a generated English .jsonl corpus (documents of 1-40 paragraphs drawn from Python's own
documentation, `pydoc_data.topics`, each numbered), then runs `python data.py` on it once per
--num_proc value, each into a fresh --data_dir, while sampling the process tree every 0.2 s:
peak RSS of the main process, and the peak of the summed PSS of the main process and its tokenizer
workers (PSS splits the pages forked workers share). `r50k_base` is GPT-2's BPE (the same ranks and
split pattern as tiktoken's `gpt2`). Results: bench_data.json and a Markdown table in --out.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def make_corpus(path, gb, seed=0):
    from pydoc_data import topics
    paras = [p for t in sorted(topics.topics) for p in topics.topics[t].split("\n\n") if p.strip()]
    rng, n, i = random.Random(seed), 0, 0
    with open(path, "w") as fh:
        while n < gb * 1e9:
            text = f"Document {i}.\n\n" + "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 40)))
            line = json.dumps({"text": text}) + "\n"
            fh.write(line)
            n, i = n + len(line), i + 1
    return i


def mem(pid):
    """(RSS of pid, PSS of pid and its descendants) in bytes, from /proc."""
    def kids(p):
        try:
            return [int(c) for t in os.listdir(f"/proc/{p}/task") for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            return []
    todo, pss, rss = [pid], 0, 0
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                if line.startswith("Rss:") and p == pid:
                    rss = int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += kids(p)
    return rss, pss


def run(corpus, args, k, data_dir):
    shutil.rmtree(data_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "--dataset", corpus, "--tokenizer", args.tokenizer,
           "--dataset_tokens", str(args.dataset_tokens), "--num_proc", str(k), "--data_dir", data_dir]
    t0, peak_rss, peak_pss = time.time(), 0, 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        rss, pss = mem(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    wall = time.time() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"data.py failed: {err.strip().splitlines()[-1]}")
    folder = out.strip().splitlines()[-1]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    tokens = meta["train_tokens"] + meta["val_tokens"]
    size = sum(os.path.getsize(os.path.join(folder, f)) for s in ("train", "val") for f, _ in meta["shards"][s])
    return {"num_proc": k, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "peak_rss_main_bytes": peak_rss, "peak_pss_all_bytes": peak_pss, "shard_bytes": size,
            "shards": len(meta["shards"]["train"]) + len(meta["shards"]["val"]), "command": " ".join(cmd[1:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus_gb", type=float, default=4.5)
    p.add_argument("--corpus", default="/tmp/bench_data_corpus.jsonl", help="written once, reused")
    p.add_argument("--dataset_tokens", type=int, default=1_000_000_000)
    p.add_argument("--tokenizer", default="r50k_base")
    p.add_argument("--num_proc", default="1,2")
    p.add_argument("--scratch", default="/tmp/bench_data_cache")
    p.add_argument("--out", default=HERE)
    args = p.parse_args()
    if not os.path.isfile(args.corpus) or os.path.getsize(args.corpus) < args.corpus_gb * 1e9:
        t0 = time.time()
        docs = make_corpus(args.corpus, args.corpus_gb)
        print(f"corpus: {docs:,} documents, {os.path.getsize(args.corpus) / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    results = []
    for k in [int(x) for x in args.num_proc.split(",")]:
        r = run(args.corpus, args, k, os.path.join(args.scratch, f"p{k}"))
        results.append(r)
        print(f"num_proc {k}: {r['tokens']:,} tokens in {r['wall_s']:.0f} s = {r['tokens_per_s'] / 1e6:.2f}M tok/s | "
              f"peak RSS (main) {r['peak_rss_main_bytes'] / 2**20:.0f} MiB | peak PSS (all) "
              f"{r['peak_pss_all_bytes'] / 2**20:.0f} MiB | {r['shard_bytes'] / 1e9:.2f} GB in {r['shards']} shards", flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = f"bench_data_{args.tokenizer}_{args.dataset_tokens}"
    with open(os.path.join(args.out, name + ".json"), "w") as fh:
        json.dump({"argv": sys.argv, "cpus": os.cpu_count(), "results": results}, fh, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as fh:
        fh.write(f"`python {' '.join(sys.argv)}` ({os.cpu_count()} CPUs)\n\n| num_proc | tokens | wall | tokens/s | peak RSS main | "
                 "peak PSS all | shards |\n|---|---|---|---|---|---|---|\n")
        for r in results:
            fh.write(f"| {r['num_proc']} | {r['tokens']:,} | {r['wall_s']:.0f} s | {r['tokens_per_s'] / 1e6:.2f}M | "
                     f"{r['peak_rss_main_bytes'] / 2**20:.0f} MiB | {r['peak_pss_all_bytes'] / 2**20:.0f} MiB | "
                     f"{r['shard_bytes'] / 1e9:.2f} GB in {r['shards']} |\n")


if __name__ == "__main__":
    main()
