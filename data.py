"""
Data: text -> tokens -> memmapped shards -> batches of random windows.

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

Documents are encoded with `encode_ordinary` (raw text containing "<|endoftext|>" cannot break it)
and joined with the end-of-text token. The token stream is cut into blocks of BLOCK tokens and
every k-th block goes to validation (k = 1 / val_fraction): a deterministic split that works for a
few long documents as well as for millions of short ones. The shards (train.bin / val.bin as
uint16 or uint32, plus meta.json) are written once under `--data_dir` and reused; their folder is
keyed on the source, `--dataset_config`, tokenizer, token budget, val_fraction and BLOCK. A local
source is keyed on its absolute path plus each file's relative path, size and mtime_ns, so an
edited file is re-tokenized; builtin and hub names are keyed on the name alone.

Batches: the global batch of update `step` is a pure function of (seed, step): `total_batch_size`
window offsets drawn from a generator seeded with (seed, step). Rank r's micro-batch m is the slice
[(m * world + r) * B, +B). So a resumed run sees exactly what an unbroken one would, DDP ranks see
different windows, and 2 ranks x 1 micro-step equals 1 rank x 2 micro-steps on the same data.
Validation uses fixed, non-overlapping windows and a per-token mean (see train.evaluate).
"""

import glob
import hashlib
import json
import os

import numpy as np
import tiktoken
import torch

BLOCK = 4096  # tokens per split block
TEXT_EXTS = ("txt", "jsonl", "json", "parquet")  # the file types local_documents reads
# suffixes that mark a --dataset name as a file (hub names may contain dots: dclm-baseline-1.0)
PATH_EXTS = tuple("." + e for e in TEXT_EXTS + ("csv", "tsv", "md", "text", "gz", "zst", "arrow"))


class DataError(ValueError):
    """Bad data input: printed as one line by train.py."""


def byte_tokenizer():
    """tiktoken with one token per byte: offline, and a 257-token vocabulary that suits a CPU."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w]+|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def get_tokenizer(name, dataset="builtin"):
    if name == "auto":
        name = "gpt2" if is_hub_name(dataset) else "bytes"
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
            table = pq.read_table(f)
            if "text" not in table.column_names:
                raise DataError(f"{f}: no 'text' column (columns: {table.column_names})")
            yield from table.column("text").to_pylist()
        else:
            raise DataError(f"unsupported file type: {f} (use .txt, .jsonl or .parquet)")


def hub_documents(name, config=None, split="train"):
    # `datasets` fails in many ways (offline, unknown name or config, a dropped stream), each with a
    # long traceback; all of them become one line that says what to do
    try:
        import datasets
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            if not isinstance(row.get("text"), str):
                raise DataError(f"hub dataset '{name}': a row without a string 'text' field (fields: {sorted(row)})")
            yield row["text"]
    except DataError:
        raise
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        cfg = f" (config '{config}')" if config else ""
        raise DataError(f"cannot load hub dataset '{name}'{cfg}: {type(e).__name__}: {why}; check the name, "
                        "--dataset_config and the network; offline, use --dataset builtin or a local path") from None


def documents(dataset, dataset_config=None):
    check_source(dataset)
    if dataset == "builtin":
        return iter(builtin_documents())
    if os.path.exists(dataset):
        return local_documents(dataset)
    return hub_documents(dataset, dataset_config)


# ----------------------------------------------------------------------------- shards

def source_key(dataset):
    """The name for builtin and hub sources; for a local one its path and its files' (path, size, mtime)."""
    if dataset == "builtin" or not os.path.exists(dataset):
        return dataset
    root = dataset if os.path.isdir(dataset) else os.path.dirname(os.path.abspath(dataset))
    stats = [(os.path.relpath(f, root), st.st_size, st.st_mtime_ns)
             for f in local_files(dataset) for st in [os.stat(f)]]
    return [os.path.abspath(dataset), sorted(stats)]


def shard_dir(data_dir, dataset, dataset_config, tokenizer_name, max_tokens, val_fraction):
    key = json.dumps([source_key(dataset), dataset_config, tokenizer_name, max_tokens, val_fraction, BLOCK])
    tag = os.path.basename(os.path.normpath(dataset)).replace("/", "_") or "data"
    return os.path.join(data_dir, f"{tag}-{tokenizer_name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def prepare(dataset="builtin", dataset_config=None, tokenizer="auto", data_dir="data_cache",
            max_tokens=50_000_000, val_fraction=0.05, log=print):
    """Tokenize a source into train.bin / val.bin once; return the shard folder."""
    dataset = os.path.expanduser(dataset)  # a quoted '~/texts' reaches us unexpanded
    check_source(dataset)  # before the tokenizer: a typo is not reported as a download failure
    enc = get_tokenizer(tokenizer, dataset)
    out = shard_dir(data_dir, dataset, dataset_config, enc.name, max_tokens, val_fraction)
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    log(f"preparing token shards for '{dataset}' with tokenizer '{enc.name}' -> {out}")
    dtype = np.uint16 if enc.n_vocab < 2 ** 16 else np.uint32
    chunks, n = [], 0
    for text in documents(dataset, dataset_config):
        ids = enc.encode_ordinary(text) + [enc.eot_token]
        chunks.append(np.asarray(ids, dtype=dtype))
        n += len(ids)
        if n >= max_tokens:
            break
    if n == 0:
        raise DataError(f"dataset '{dataset}' contains no text")
    tokens = np.concatenate(chunks)[:max_tokens]
    every = max(2, round(1 / val_fraction))
    blocks = np.arange(len(tokens)) // BLOCK
    is_val = (blocks % every) == every - 1
    if not is_val.any():  # a corpus shorter than `every` blocks: keep its tail for validation
        is_val[-max(1, int(len(tokens) * val_fraction)):] = True
    os.makedirs(out, exist_ok=True)
    meta = {"dataset": dataset, "dataset_config": dataset_config, "tokenizer": enc.name,
            "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": np.dtype(dtype).name,
            "train_tokens": int((~is_val).sum()), "val_tokens": int(is_val.sum()),
            "val_fraction": val_fraction, "block": BLOCK}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        tmp = os.path.join(out, f"{split}.bin.tmp")
        tokens[mask].tofile(tmp)
        os.replace(tmp, os.path.join(out, f"{split}.bin"))
    with open(os.path.join(out, "meta.json.tmp"), "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # written last
    log(f"  {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens")
    return out


class TokenData:
    """Random training windows and fixed validation windows over prepared shards."""

    def __init__(self, folder, max_length, seed=0):
        with open(os.path.join(folder, "meta.json")) as fh:
            self.meta = json.load(fh)
        self.folder, self.T, self.seed = folder, max_length, seed
        self.vocab_size = self.meta["vocab_size"]
        for split in ("train", "val"):
            if self.meta[f"{split}_tokens"] < max_length + 1:
                raise DataError(f"the {split} split has {self.meta[f'{split}_tokens']} tokens, fewer than one "
                                f"window of --max_length {max_length} + 1; use more data or a shorter --max_length")

    def tokens(self, split):
        # a fresh memmap per call: numpy memmaps otherwise keep growing resident memory
        return np.memmap(os.path.join(self.folder, f"{split}.bin"), dtype=self.meta["dtype"], mode="r")

    def batch(self, step, batch_size, total_batch_size, micro=0, rank=0, world=1):
        """Rank `rank`'s micro-batch `micro` of update `step`: (x, y), each (batch_size, T) int64."""
        data = self.tokens("train")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        offsets = torch.randint(0, len(data) - self.T - 1, (total_batch_size,), generator=g)
        start = (micro * world + rank) * batch_size
        rows = [torch.from_numpy(data[o:o + self.T + 1].astype(np.int64)) for o in offsets[start:start + batch_size].tolist()]
        xy = torch.stack(rows)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    def val_windows(self, max_tokens):
        """Fixed non-overlapping windows at the start of the val split: (N, T + 1) int64."""
        data = self.tokens("val")
        n = max(1, min((len(data) - 1) // self.T, max_tokens // self.T))
        xy = np.stack([data[i * self.T:i * self.T + self.T + 1] for i in range(n)]).astype(np.int64)
        return torch.from_numpy(xy)


def decode(tokenizer_name, ids):
    enc = byte_tokenizer() if tokenizer_name == "bytes" else tiktoken.get_encoding(tokenizer_name)
    return enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")
