"""
Data: text -> tokens -> token shards on disk -> batches of random windows.

    python data.py --dataset allenai/c4 --dataset_config en --dataset_tokens 1_100_000_000   # prepare ahead
    python train.py --dataset allenai/c4 --dataset_config en --dataset_tokens 1_100_000_000  # finds the same folder

Sources (`--dataset`):
  builtin              English text that ships with Python (`pydoc_data.topics`, ~465 KB): no network
  path/to/file_or_dir  local .txt / .jsonl / .parquet files (jsonl and parquet: the "text" field)
  owner/name           a Hugging Face hub dataset, streamed up to `--dataset_tokens`
                       (`--dataset allenai/c4 --dataset_config en`, `--dataset roneneldan/TinyStories`)
A name that looks like a path (leading . / ~, a text-file extension, two or more slashes) but does
not exist fails as "dataset path not found" before any tokenizer download; any failure to load or
stream a hub dataset becomes one line too (offline: --dataset builtin or a local path).

Tokenizers (`--tokenizer`, tiktoken in both cases):
  bytes   a byte-level tiktoken.Encoding (256 bytes + <|endoftext|> = 257 tokens); needs no download
  gpt2    GPT-2 BPE (50257 tokens); downloads its files on first use
  auto    gpt2 for hub datasets, bytes otherwise (the default)

Text -> tokens. Documents are encoded with `encode_ordinary` (raw text containing "<|endoftext|>"
cannot break it), each followed by the end-of-text token, in batches of about 1 MB of text spread
over `--num_proc` worker processes (0: every core) and put back in document order, so the stream is
the same for any number of workers. Processes, not tiktoken's threaded batch encoding: on 2 cores
the two measured alike, and processes also run the list -> numpy conversion in parallel.

Tokens -> shards. The stream is cut into blocks of BLOCK tokens and every k-th block goes to
validation (k = round(1 / val_fraction)): deterministic, with no index over the whole stream, and
it works for a few long documents as well as for millions of short ones. A hub dataset with its
own validation split (C4's `validation`, which the papers evaluate on) gives the validation
tokens from that split instead (`--val_split`). Tokens go to disk as they are produced, in chunks
of about SHARD_TOKENS stream tokens: chunk c is written as train_0000c.bin and val_0000c.bin
(uint16 when the vocabulary fits, else uint32), so memory does not grow with `--dataset_tokens`.
After each chunk, progress.json records where the source stands (document index, and tokens of
that document already used): a preparation killed at any point (SIGKILL, a dropped hub stream, a
full disk) continues from its last complete chunk when run again and ends byte-identical to an
unbroken one. meta.json, written last, lists every shard and its size; a folder without it, or
whose shards do not match it, is never used for training. A file lock lets several processes
(DDP ranks, two runs) ask for the same folder: one prepares, the others wait for it.

The folder is keyed on the source, `--dataset_config`, tokenizer, token budget, val_fraction,
`--val_split` and BLOCK. A local source is keyed on its absolute path plus each file's relative
path, size and mtime_ns, so an edited file is re-tokenized; builtin and hub names on the name.

Batches: the global batch of update `step` is a pure function of (seed, step): `total_batch_size`
window offsets into the training split (all its shards, one after another) drawn from a generator
seeded with (seed, step). Rank r's micro-batch m is the slice [(m * world + r) * B, +B). So a
resumed run sees exactly what an unbroken one would, DDP ranks see different windows, and 2 ranks
x 1 micro-step equals 1 rank x 2 micro-steps on the same data. Validation uses fixed,
non-overlapping windows at the start of the validation split and a per-token mean (train.evaluate).
"""

import argparse
import collections
import contextlib
import errno
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import tiktoken
import torch

BLOCK = 4096  # tokens per split block
SHARD_TOKENS = 2 ** 26  # stream tokens per chunk (rounded to whole split periods): 128 MiB of uint16
TEXT_BATCH = 1 << 20  # characters of text per tokenizer task
PROGRESS_EVERY = 5.0  # seconds between plain progress lines when stderr is not a terminal
FORMAT = 2  # of the shard folder (1: one train.bin and val.bin, built in memory)
TEXT_EXTS = ("txt", "jsonl", "json", "parquet")  # the file types local_documents reads
# suffixes that mark a --dataset name as a file (hub names may contain dots: dclm-baseline-1.0)
PATH_EXTS = tuple("." + e for e in TEXT_EXTS + ("csv", "tsv", "md", "text", "gz", "zst", "arrow"))


class DataError(ValueError):
    """Bad data input: printed as one line by train.py and data.py."""


def byte_tokenizer():
    """tiktoken with one token per byte: offline, and a 257-token vocabulary that suits a CPU."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w]+|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def tokenizer_name(name, dataset="builtin"):
    return ("gpt2" if is_hub_name(dataset) else "bytes") if name == "auto" else name


def get_tokenizer(name, dataset="builtin"):
    name = tokenizer_name(name, dataset)
    if name == "bytes":
        return byte_tokenizer()
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline, or an unknown name
        raise DataError(f"cannot load tiktoken encoding '{name}' ({type(e).__name__}: {e}); "
                        "offline, use --tokenizer bytes") from None


def looks_like_path(name):
    return (name.startswith((".", "/", "~")) or name.lower().endswith(PATH_EXTS)
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def is_hub_name(dataset):
    return (dataset != "builtin" and not os.path.exists(dataset) and not looks_like_path(dataset)
            and dataset.count("/") == 1)


def check_source(dataset):
    """Fail on a missing path or an unusable name before a tokenizer (maybe a download) is loaded."""
    if dataset == "builtin" or os.path.exists(dataset) or is_hub_name(dataset):
        return
    if looks_like_path(dataset):  # a typo in a local path, not a hub name that failed to download
        raise DataError(f"dataset path not found: {dataset} "
                        "(it is neither 'builtin', an existing path, nor a hub name owner/name)")
    raise DataError(f"dataset '{dataset}' is neither 'builtin', an existing path, nor a hub name owner/name")


# ----------------------------------------------------------------------------- text sources

def builtin_documents():
    from pydoc_data import topics
    return [topics.topics[k] for k in sorted(topics.topics)]


def local_files(path):
    """The files a local source reads, sorted (the shard key is built from the same list)."""
    if not os.path.isdir(path):
        return [path]
    files = sorted(f for ext in TEXT_EXTS for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
    if not files:
        raise DataError(f"no .txt, .jsonl or .parquet files under {path}")
    return files


def local_documents(path):
    for f in local_files(path):
        if f.endswith(".txt"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()
        elif f.endswith((".jsonl", ".json")):
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{f}:{i + 1}: expected a JSON object with a 'text' field") from None
        elif f.endswith(".parquet"):
            import pyarrow.parquet as pq  # installed with `datasets`
            pf = pq.ParquetFile(f)
            if "text" not in pf.schema_arrow.names:
                raise DataError(f"{f}: no 'text' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["text"], batch_size=4096):  # one batch in memory at a time
                yield from batch.column(0).to_pylist()
        else:
            raise DataError(f"unsupported file type: {f} (use .txt, .jsonl or .parquet)")


def hub_error(name, config, e, when=""):
    # `datasets` fails in many ways (offline, unknown name or config, a dropped stream), each with a
    # long traceback; all of them become one line that says what to do
    why = (str(e).strip().splitlines() or [""])[0][:200]
    cfg = f" (config '{config}')" if config else ""
    return DataError(f"cannot load hub dataset '{name}'{cfg}{when}: {type(e).__name__}: {why}; check the name, "
                     "--dataset_config and the network; offline, use --dataset builtin or a local path")


def hub_splits(name, config):
    """The hub dataset's streamed splits, {split name: iterable of rows}."""
    try:
        import datasets
        return dict(datasets.load_dataset(name, config, streaming=True))
    except Exception as e:
        raise hub_error(name, config, e) from None


def hub_documents(rows, name, config):
    n = 0
    try:
        for row in rows:
            if not isinstance(row.get("text"), str):
                raise DataError(f"hub dataset '{name}': a row without a string 'text' field (fields: {sorted(row)})")
            n += 1
            yield row["text"]
    except DataError:
        raise
    except Exception as e:  # a stream that dropped: the chunks written so far are kept
        raise hub_error(name, config, e, f" (the stream stopped after {n:,} documents; run again to "
                                         "continue from the last complete shard)") from None


def sources(dataset, dataset_config=None, val_split="auto"):
    """-> {"train": documents, "val": documents or None}: None means validation blocks of the train stream."""
    if dataset == "builtin":
        docs = builtin_documents()
        return {"train": lambda: iter(docs), "val": None}
    if os.path.exists(dataset):
        return {"train": lambda: local_documents(dataset), "val": None}
    splits = hub_splits(dataset, dataset_config)
    if "train" not in splits:
        raise DataError(f"hub dataset '{dataset}' has no 'train' split (splits: {sorted(splits)})")
    val = {"auto": "validation" if "validation" in splits else None, "none": None}.get(val_split, val_split)
    if val is not None and val not in splits:
        raise DataError(f"--val_split {val_split}: hub dataset '{dataset}' has the splits {sorted(splits)}")
    docs = lambda split: (lambda: hub_documents(splits[split], dataset, dataset_config))  # noqa: E731
    return {"train": docs("train"), "val": docs(val) if val else None, "val_split": val}


# ----------------------------------------------------------------------------- text -> tokens

_worker = {}  # the tokenizer of a worker process


def _init_worker(enc, dtype):
    _worker.update(enc=enc, dtype=dtype)


def encode(texts, enc=None, dtype=None):
    """Each text's tokens followed by end-of-text, concatenated -> (tokens, tokens per text)."""
    enc, dtype = enc or _worker["enc"], dtype or _worker["dtype"]
    ids = [np.asarray(enc.encode_ordinary(t) + [enc.eot_token], dtype=dtype) for t in texts]
    return np.concatenate(ids), np.array([len(i) for i in ids], dtype=np.int64)


def text_batches(docs):
    batch, n, chars = [], 0, TEXT_BATCH
    for text in docs:
        batch.append(text)
        n += len(text)
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def encode_stream(docs, enc, dtype, num_proc):
    """encode() of each batch of documents, in order, on `num_proc` worker processes. At most two
    batches per worker are in flight, so memory stays bounded however fast the source reads."""
    if num_proc <= 1:
        yield from (encode(b, enc, dtype) for b in text_batches(docs))
        return
    # fork (Linux) starts workers without re-importing this module; spawn elsewhere
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(num_proc, _init_worker, (enc, dtype)) as pool:
        pending = collections.deque()
        for batch in text_batches(docs):
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- tokens -> shards

def source_key(dataset):
    """The name for builtin and hub sources; for a local one its path and its files' (path, size, mtime)."""
    if dataset == "builtin" or not os.path.exists(dataset):
        return dataset
    root = dataset if os.path.isdir(dataset) else os.path.dirname(os.path.abspath(dataset))
    stats = [(os.path.relpath(f, root), st.st_size, st.st_mtime_ns)
             for f in local_files(dataset) for st in [os.stat(f)]]
    return [os.path.abspath(dataset), sorted(stats)]


def shard_folder(dataset, dataset_config=None, tokenizer="auto", data_dir="data_cache", max_tokens=50_000_000,
                 val_fraction=0.05, val_split="auto"):
    """The folder prepare() writes for these arguments; no network, no tokenizer."""
    dataset = os.path.expanduser(dataset)
    tok = tokenizer_name(tokenizer, dataset)
    split_key = val_split if is_hub_name(dataset) else "blocks"  # local sources always use blocks
    key = json.dumps([FORMAT, source_key(dataset), dataset_config, tok, max_tokens, val_fraction, BLOCK, split_key])
    tag = os.path.basename(os.path.normpath(dataset)).replace("/", "_") or "data"
    return os.path.join(data_dir, f"{tag}-{tok}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


class Progress:
    """Tokens done against the budget: a tqdm bar on a terminal, else a plain line every PROGRESS_EVERY s."""

    def __init__(self, total, done, log):
        from tqdm import tqdm
        self.total, self.done, self.log, self.every = total, done, log, PROGRESS_EVERY
        self.t0 = self.t_last = time.time()
        self.start = done
        self.bar = tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc="tokenizing",
                        disable=not sys.stderr.isatty(), smoothing=0.1)

    def update(self, n):
        self.done += n
        self.bar.update(n)
        now = time.time()
        if self.bar.disable and now - self.t_last >= self.every:
            self.t_last, rate = now, (self.done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"  {self.done:,} / {self.total:,} tokens ({100 * self.done / self.total:.1f}%) | "
                     f"{rate / 1e6:.2f}M tok/s | ETA {eta / 60:.1f} min")

    def close(self):
        self.bar.close()


def route_blocks(every):
    """Where each token of the stream goes: block b = [b * BLOCK, (b + 1) * BLOCK) to validation iff
    b % every == every - 1. -> route(tokens, pos) yielding (split, piece) for tokens at stream pos."""
    def route(tokens, pos):
        while len(tokens):
            take = BLOCK - pos % BLOCK
            yield ("val" if (pos // BLOCK) % every == every - 1 else "train"), tokens[:take]
            tokens, pos = tokens[take:], pos + take
    return route


def write_stream(out, state, docs, enc, dtype, budget, route, num_proc, progress, save_progress, tail_fraction=0.0):
    """Tokenize `docs` into chunk files of `state["chunk"]` stream tokens, from where `state` stands.

    state: tokens (stream position), doc and skip (the source document there and how many of its
    tokens are already used), chunks (complete so far), shards ({split: [[file, tokens], ...]}), done.
    A chunk's files are written as .tmp and renamed when complete; then state goes to progress.json.
    tail_fraction: when the stream routed nothing to validation, that fraction of its end goes there."""
    chunk, pos, files = state["chunk"], state["tokens"], {}

    def close_chunk(doc, skip):
        for split, (fh, name, n) in files.items():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
            state["shards"][split].append([name, n])
        files.clear()
        state.update(tokens=pos, doc=doc, skip=skip, chunks=state["chunks"] + 1)
        save_progress()

    doc0, skip0 = state["doc"], state["skip"]  # the document the next batch starts with, tokens to drop
    for tokens, lengths in encode_stream(itertools.islice(docs, doc0, None), enc, dtype, num_proc):
        ends = np.cumsum(lengths)  # batch offsets where each document ends
        i = skip0
        while i < len(tokens) and pos < budget:
            take = min(len(tokens) - i, chunk - pos % chunk, budget - pos)
            for split, piece in route(tokens[i:i + take], pos):
                if split not in files:
                    name = f"{split}_{state['chunks']:05d}.bin"
                    files[split] = [open(os.path.join(out, name + ".tmp"), "wb"), name, 0]
                files[split][0].write(memoryview(piece))
                files[split][2] += len(piece)
            i, pos = i + take, pos + take
            progress.update(take)
            if pos % chunk == 0:  # a complete chunk: where does the source stand?
                k = int(np.searchsorted(ends, i, side="right"))  # documents of this batch fully used
                close_chunk(doc0 + k, i - (int(ends[k - 1]) if k else 0))
        doc0, skip0 = doc0 + len(lengths), 0
        if pos >= budget:
            break
    if tail_fraction and "train" in files and "val" not in files and not state["shards"]["val"]:
        # the whole stream is shorter than `every` blocks (so still in this first chunk): its tail
        # becomes validation
        fh, name, n = files["train"]
        tail = max(1, int(n * tail_fraction))
        fh.flush()
        data = np.fromfile(os.path.join(out, name + ".tmp"), dtype=dtype)[n - tail:]
        fh.seek((n - tail) * data.itemsize)
        fh.truncate()
        files["train"][2] = n - tail
        files["val"] = [open(os.path.join(out, f"val_{state['chunks']:05d}.bin.tmp"), "wb"), f"val_{state['chunks']:05d}.bin", tail]
        files["val"][0].write(memoryview(data))
    if files or pos % chunk:  # the last, partial chunk
        close_chunk(None, 0)
    state["done"] = True
    save_progress()


def prepare(dataset="builtin", dataset_config=None, tokenizer="auto", data_dir="data_cache",
            max_tokens=50_000_000, val_fraction=0.05, log=print, num_proc=0, val_split="auto",
            shard_tokens=SHARD_TOKENS):
    """Tokenize a source into token shards once (or continue an interrupted preparation); -> folder."""
    dataset = os.path.expanduser(dataset)  # a quoted '~/texts' reaches us unexpanded
    check_source(dataset)  # before the tokenizer: a typo is not reported as a download failure
    if not is_hub_name(dataset) and val_split not in ("auto", "none"):
        raise DataError(f"--val_split {val_split} is for hub datasets; local and builtin sources use the block split")
    out = shard_folder(dataset, dataset_config, tokenizer, data_dir, max_tokens, val_fraction, val_split)
    if os.path.isfile(os.path.join(out, "meta.json")):
        read_meta(out)  # complete, or one line naming the broken file
        return out
    enc = get_tokenizer(tokenizer, dataset)
    os.makedirs(out, exist_ok=True)
    with prepare_lock(out, log):
        if os.path.isfile(os.path.join(out, "meta.json")):  # another process prepared it meanwhile
            read_meta(out)
            return out
        try:
            _prepare(out, dataset, dataset_config, enc, max_tokens, val_fraction, log, num_proc, val_split, shard_tokens)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            need = max_tokens * np.dtype(token_dtype(enc)).itemsize
            raise DataError(f"disk full while writing token shards to {out}: this budget needs up to "
                            f"{need / 1e9:.2f} GB there ({free_gb(out):.2f} GB free); free space or choose "
                            "another --data_dir, then run again to continue from the last complete shard") from None
    return out


def token_dtype(enc):
    return np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32


def free_gb(path):
    import shutil
    return shutil.disk_usage(path).free / 1e9


def _prepare(out, dataset, dataset_config, enc, max_tokens, val_fraction, log, num_proc, val_split, shard_tokens):
    dtype, every = token_dtype(enc), max(2, round(1 / val_fraction))
    src = sources(dataset, dataset_config, val_split)
    if src["val"] is None:  # validation blocks inside the one stream
        period = every * BLOCK  # whole periods per chunk: every chunk holds the same split pattern
        plan = [("stream", src["train"], max_tokens, route_blocks(every), max(1, round(shard_tokens / period)) * period,
                 val_fraction)]
    else:  # the hub's own validation split, then the training split
        n_val = max(1, round(max_tokens * val_fraction))
        plan = [("val", src["val"], n_val, lambda t, pos: [("val", t)], shard_tokens, 0.0),
                ("train", src["train"], max_tokens - n_val, lambda t, pos: [("train", t)], shard_tokens, 0.0)]
    progress_path = os.path.join(out, "progress.json")
    prog = json.load(open(progress_path)) if os.path.isfile(progress_path) else {}
    states = prog.get("streams") or {name: {"chunk": c, "tokens": 0, "doc": 0, "skip": 0, "chunks": 0, "done": False,
                                            "shards": {"train": [], "val": []}} for name, _, _, _, c, _ in plan}
    for f in glob.glob(os.path.join(out, "*.tmp")):  # parts of a chunk that never completed
        os.remove(f)
    done = sum(s["tokens"] for s in states.values())
    log(f"preparing token shards for '{dataset}' with tokenizer '{enc.name}' -> {out}"
        + (f" (continuing at {done:,} tokens)" if done else ""))

    def save_progress():
        with open(progress_path + ".tmp", "w") as fh:
            json.dump({"streams": states}, fh)
        os.replace(progress_path + ".tmp", progress_path)

    progress = Progress(max_tokens, done, log)
    workers = num_proc or os.cpu_count() or 1
    try:
        for name, docs, budget, route, _, tail in plan:
            if not states[name]["done"]:
                write_stream(out, states[name], docs(), enc, dtype, budget, route, workers, progress, save_progress, tail)
    finally:
        progress.close()
    shards = {s: [sh for st in states.values() for sh in st["shards"][s]] for s in ("train", "val")}
    n = {s: sum(k for _, k in shards[s]) for s in shards}
    if n["train"] + n["val"] == 0:
        raise DataError(f"dataset '{dataset}' contains no text")
    meta = {"format": FORMAT, "dataset": dataset, "dataset_config": dataset_config, "tokenizer": enc.name,
            "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": np.dtype(dtype).name,
            "train_tokens": n["train"], "val_tokens": n["val"], "val_fraction": val_fraction, "block": BLOCK,
            "val_source": f"hub split '{src['val_split']}'" if src["val"] else f"every {every}th block of {BLOCK} tokens",
            "shards": shards}
    with open(os.path.join(out, "meta.json.tmp"), "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # written last
    os.remove(progress_path)
    log(f"  {n['train']:,} train tokens, {n['val']:,} val tokens in {len(shards['train']) + len(shards['val'])} shards")


@contextlib.contextmanager
def prepare_lock(folder, log):
    """One preparer per folder (an OS file lock: released when its process dies, even by SIGKILL)."""
    with open(os.path.join(folder, "prepare.lock"), "w") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; prepare a folder from one process at a time
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is preparing {folder}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def read_meta(folder):
    """meta.json of a complete shard folder, its shards checked against it; else one clear DataError."""
    path = os.path.join(folder, "meta.json")
    redo = f"delete {folder} and prepare it again (python data.py, or train.py, with the same data flags)"
    if not os.path.isfile(path):
        raise DataError(f"{folder} is not a complete token shard folder (no meta.json): run python data.py "
                        "(or train.py) with the same data flags to finish it")
    try:
        with open(path) as fh:
            meta = json.load(fh)
        shards, itemsize = meta["shards"], np.dtype(meta["dtype"]).itemsize
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is corrupt or from an older version: {redo}") from None
    for split in ("train", "val"):
        for name, n in shards[split]:
            f = os.path.join(folder, name)
            size = os.path.getsize(f) if os.path.isfile(f) else None
            if size != n * itemsize:
                raise DataError(f"token shard {f} is {'missing' if size is None else f'{size:,} bytes'}, meta.json "
                                f"says {n * itemsize:,}: the folder is truncated or corrupt; {redo}")
    return meta


def wait_until_prepared(folder, log=print, poll_s=1.0, say_every=30.0):
    """Wait (no collective, no network) until another process has completed `folder`; -> folder."""
    t0 = t_said = time.time()
    while not os.path.isfile(os.path.join(folder, "meta.json")):
        if time.time() - t_said >= say_every:
            t_said = time.time()
            log(f"waiting for the token shards in {folder} ({t_said - t0:.0f} s)")
        time.sleep(poll_s)
    read_meta(folder)
    return folder


def iter_tokens(folder, split):
    """A split's tokens in order, one numpy array (memory-mapped) per shard."""
    meta = read_meta(folder)
    for name, n in meta["shards"][split]:
        yield np.memmap(os.path.join(folder, name), dtype=meta["dtype"], mode="r", shape=(n,))


# ----------------------------------------------------------------------------- batches

class TokenData:
    """Random training windows and fixed validation windows over a complete shard folder."""

    def __init__(self, folder, max_length, seed=0):
        self.meta = read_meta(folder)
        self.folder, self.T, self.seed = folder, max_length, seed
        self.vocab_size = self.meta["vocab_size"]
        self.shards = {s: [(os.path.join(folder, name), n) for name, n in self.meta["shards"][s]] for s in ("train", "val")}
        self.starts = {s: np.cumsum([0] + [n for _, n in self.shards[s]]) for s in self.shards}  # first token of each
        for split in ("train", "val"):
            if self.meta[f"{split}_tokens"] < max_length + 1:
                raise DataError(f"the {split} split has {self.meta[f'{split}_tokens']} tokens, fewer than one "
                                f"window of --max_length {max_length} + 1; use more data or a shorter --max_length")

    def read(self, split, start, length, maps):
        """Tokens [start, start + length) of a split, across shard boundaries. `maps` caches this call's
        memmaps (a fresh one per call: a long-lived numpy memmap keeps growing resident memory)."""
        i, parts = int(np.searchsorted(self.starts[split], start, side="right")) - 1, []
        while length > 0:
            if (split, i) not in maps:
                maps[split, i] = np.memmap(self.shards[split][i][0], dtype=self.meta["dtype"], mode="r")
            lo = start - int(self.starts[split][i])
            parts.append(maps[split, i][lo:lo + length])
            start, length, i = start + len(parts[-1]), length - len(parts[-1]), i + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def batch(self, step, batch_size, total_batch_size, micro=0, rank=0, world=1):
        """Rank `rank`'s micro-batch `micro` of update `step`: (x, y), each (batch_size, T) int64."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        offsets = torch.randint(0, self.meta["train_tokens"] - self.T - 1, (total_batch_size,), generator=g)
        start, maps = (micro * world + rank) * batch_size, {}
        rows = [self.read("train", o, self.T + 1, maps) for o in offsets[start:start + batch_size].tolist()]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def val_windows(self, max_tokens):
        """Fixed non-overlapping windows at the start of the val split: (N, T + 1) int64."""
        n = max(1, min((self.meta["val_tokens"] - 1) // self.T, max_tokens // self.T))
        data = self.read("val", 0, n * self.T + 1, {})
        xy = np.stack([data[i * self.T:i * self.T + self.T + 1] for i in range(n)]).astype(np.int64)
        return torch.from_numpy(xy)


def decode(tokenizer_name, ids):
    enc = byte_tokenizer() if tokenizer_name == "bytes" else tiktoken.get_encoding(tokenizer_name)
    return enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    """python data.py --dataset D ...: prepare the shards ahead of training; the folder is the last stdout line."""
    p = argparse.ArgumentParser(description="Prepare token shards ahead of training (train.py with the same "
                                            "data flags finds the same folder).")
    p.add_argument("--dataset", default="builtin", help="builtin | a local .txt/.jsonl/.parquet file or folder | owner/name")
    p.add_argument("--dataset_config", default=None, help="hub dataset config, e.g. en for allenai/c4")
    p.add_argument("--tokenizer", default="auto", help="auto (gpt2 for hub data, bytes otherwise) | bytes | gpt2 | any tiktoken name")
    p.add_argument("--dataset_tokens", type=int, default=50_000_000, help="token budget read from the source")
    p.add_argument("--data_dir", default="data_cache", help="where token shards are written and reused")
    p.add_argument("--val_fraction", type=float, default=0.05, help="fraction of the tokens held out for validation")
    p.add_argument("--val_split", default="auto", help="hub split for validation: auto (validation if the dataset has "
                                                       "it, else blocks of the train stream) | none | a split name")
    p.add_argument("--num_proc", type=int, default=0, help="tokenizer worker processes (0: every core)")
    p.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="stream tokens per shard chunk "
                                                                          "(the unit of resuming)")
    a = p.parse_args(argv)
    say = lambda *m: print(*m, file=sys.stderr, flush=True)  # noqa: E731  stdout carries only the folder
    try:
        folder = prepare(a.dataset, a.dataset_config, a.tokenizer, a.data_dir, a.dataset_tokens, a.val_fraction,
                         log=say, num_proc=a.num_proc, val_split=a.val_split, shard_tokens=a.shard_tokens)
    except DataError as e:
        say(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue from the last complete shard")
        sys.exit(130)
    print(folder)


if __name__ == "__main__":
    main()
