import json
import os

import numpy as np
import pytest
import torch

import data


def folder_bytes(folder):
    """{file: bytes} of a shard folder's shards and meta.json (what training reads)."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith((".bin", "meta.json"))}


def test_byte_tokenizer_roundtrip_and_vocab():
    enc = data.byte_tokenizer()
    text = "Héllo, wörld <|endoftext|> ✓"
    ids = enc.encode_ordinary(text)  # the special string is plain text here
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert max(ids) < 256 and enc.decode(ids) == text


def test_builtin_shards_split_and_meta(data_dir):
    folder = data.prepare("builtin", tokenizer="bytes", data_dir=data_dir, log=lambda *a: None)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257
    assert meta["train_tokens"] > 400_000 and meta["val_tokens"] > 10_000  # a few hundred KB of English
    frac = meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert 0.03 < frac < 0.07
    for split in ("train", "val"):
        assert sum(os.path.getsize(os.path.join(folder, f)) for f, _ in meta["shards"][split]) == 2 * meta[f"{split}_tokens"]
    assert sorted(os.listdir(folder)) == ["meta.json", "prepare.lock", "train_00000.bin", "val_00000.bin"]


def test_prepare_is_deterministic_and_reused(tmp_path):
    a = data.prepare("builtin", tokenizer="bytes", data_dir=str(tmp_path / "a"), log=lambda *a: None)
    b = data.prepare("builtin", tokenizer="bytes", data_dir=str(tmp_path / "b"), log=lambda *a: None)
    assert folder_bytes(a) == folder_bytes(b)
    msgs = []
    assert data.prepare("builtin", tokenizer="bytes", data_dir=str(tmp_path / "a"), log=msgs.append) == a
    assert msgs == []  # second call reuses the shards


def test_train_and_val_tokens_are_disjoint_blocks(tmp_path):
    # a corpus of distinct numbered lines: every block of the stream lands in exactly one split
    text = "".join(f"line {i:06d}\n" for i in range(20000))
    (tmp_path / "c.txt").write_text(text)
    folder = data.prepare(str(tmp_path / "c.txt"), tokenizer="bytes", data_dir=str(tmp_path / "cache"), log=lambda *a: None)
    train, val = (bytes(np.concatenate(list(data.iter_tokens(folder, s))).astype(np.uint8)) for s in ("train", "val"))
    val = val[:-1]
    whole = text.encode()
    assert len(train) + len(val) + 1 == len(whole) + 1  # + the end-of-text token
    assert val[200:264] in whole and val[200:264] not in train


def test_batches_depend_only_on_seed_and_step(data_dir):
    folder = data.prepare("builtin", tokenizer="bytes", data_dir=data_dir, log=lambda *a: None)
    td = data.TokenData(folder, 32, seed=0)
    x1, y1 = td.batch(step=5, batch_size=4, total_batch_size=8)
    x2, y2 = td.batch(step=5, batch_size=4, total_batch_size=8)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    assert not torch.equal(x1, td.batch(step=6, batch_size=4, total_batch_size=8)[0])
    assert not torch.equal(x1, data.TokenData(folder, 32, seed=1).batch(5, 4, 8)[0])
    # the global batch is the same however it is split over micro-steps and ranks
    big = td.batch(5, 8, 8)[0]
    assert torch.equal(torch.cat([td.batch(5, 4, 8, micro=m)[0] for m in range(2)]), big)
    assert torch.equal(torch.cat([td.batch(5, 4, 8, rank=r, world=2)[0] for r in range(2)]), big)
    assert not torch.equal(td.batch(5, 4, 8, rank=0, world=2)[0], td.batch(5, 4, 8, rank=1, world=2)[0])


def test_validation_windows_are_fixed(data_dir):
    folder = data.prepare("builtin", tokenizer="bytes", data_dir=data_dir, log=lambda *a: None)
    td = data.TokenData(folder, 32)
    w = td.val_windows(1024)
    assert w.shape == (32, 33) and torch.equal(w, td.val_windows(1024))
    val = np.concatenate(list(data.iter_tokens(folder, "val")))
    assert torch.equal(w[1], torch.from_numpy(val[32:65].astype(np.int64)))


def test_local_txt_jsonl_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [f"document number {i} " * 30 for i in range(40)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(docs[0])
    with open(tmp_path / "src" / "b.jsonl", "w") as fh:
        for d in docs[1:20]:
            fh.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[20:]}), tmp_path / "src" / "c.parquet")
    folder = data.prepare(str(tmp_path / "src"), tokenizer="bytes", data_dir=str(tmp_path / "cache"), log=lambda *a: None)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(d) + 1 for d in docs)  # bytes + one EOT each


def test_bad_inputs(tmp_path):
    with pytest.raises(data.DataError, match="dataset path not found"):
        data.prepare(str(tmp_path / "nope"), tokenizer="bytes", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="neither"):
        data.prepare("nope_not_a_dataset", tokenizer="bytes", data_dir=str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(data.DataError, match="'text' field"):
        data.prepare(str(tmp_path / "bad.jsonl"), tokenizer="bytes", data_dir=str(tmp_path))
    (tmp_path / "short.txt").write_text("too short")
    folder = data.prepare(str(tmp_path / "short.txt"), tokenizer="bytes", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.TokenData(folder, 128)


def test_hub_dataset_is_streamed_up_to_the_token_budget(tmp_path, monkeypatch):
    import datasets
    calls = {}

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return {"train": ({"text": f"doc {i} " * 50} for i in range(10**6))}  # "endless" stream, no validation

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.is_hub_name("allenai/c4") and not data.is_hub_name("builtin")
    folder = data.prepare("allenai/c4", "en", tokenizer="bytes", data_dir=str(tmp_path), max_tokens=20_000,
                          log=lambda *a: None)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert calls == {"name": "allenai/c4", "config": "en", "split": None, "streaming": True}
    assert meta["train_tokens"] + meta["val_tokens"] == 20_000


def test_edited_local_files_are_tokenized_again(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("old text " * 100)
    (tmp_path / "src" / "b.txt").write_text("unchanged " * 100)
    prep = lambda: data.prepare(str(tmp_path / "src"), tokenizer="bytes", data_dir=str(tmp_path / "cache"),  # noqa: E731
                                log=lambda *a: None)
    first = prep()
    assert prep() == first  # unchanged files: the shards are reused
    (tmp_path / "src" / "a.txt").write_text("new words here " * 100)  # another size ...
    st = os.stat(tmp_path / "src" / "a.txt")
    os.utime(tmp_path / "src" / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # ... and mtime
    second = prep()
    assert second != first and os.path.isdir(first)
    tokens = np.concatenate([t for s in ("train", "val") for t in data.iter_tokens(second, s)])
    assert b"new words here" in bytes(tokens[tokens < 256].astype(np.uint8))
    # the same size but a newer mtime (an edit in place) is a new key too; a single file likewise
    os.utime(tmp_path / "src" / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert prep() not in (first, second)
    key = lambda: data.shard_folder(str(tmp_path / "src" / "a.txt"), None, "bytes", "c", 100, 0.05)  # noqa: E731
    before = key()
    assert key() == before  # deterministic
    os.utime(tmp_path / "src" / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
    assert key() != before
    assert data.shard_folder("builtin", None, "bytes", "c", 100, 0.05) == data.shard_folder("builtin", None, "bytes", "c", 100, 0.05)


def test_hub_failures_are_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(name, config=None, split=None, streaming=False):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\n  more\n  lines")

    def bad_config(name, config=None, split=None, streaming=False):
        def rows():  # load_dataset succeeds; the first row fails (how streaming reports some errors)
            raise ValueError(f"BuilderConfig '{config}' not found.\nAvailable: ['en', 'realnewslike']")
            yield {}
        return {"train": rows()}

    for fake, cause in ((offline, "ConnectionError"), (bad_config, "ValueError")):
        monkeypatch.setattr(datasets, "load_dataset", fake)
        with pytest.raises(data.DataError) as err:
            data.prepare("allenai/c4", "xx", tokenizer="bytes", data_dir=str(tmp_path), log=lambda *a: None)
        msg = str(err.value)
        assert "\n" not in msg and "'allenai/c4'" in msg and cause in msg
        assert "check the name" in msg and "--dataset builtin or a local path" in msg
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"train": iter([{"content": "x"}])})
    with pytest.raises(data.DataError, match="'text' field"):
        data.prepare("allenai/c4", tokenizer="bytes", data_dir=str(tmp_path), log=lambda *a: None)


def test_missing_paths_fail_before_the_tokenizer(tmp_path, monkeypatch):
    import tiktoken

    def no_download(name):
        raise AssertionError("the tokenizer was loaded")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.chdir(tmp_path)
    for name in ("./my_textz", "/tmp/nothere_lowrank_test", "notes.txt", "corpus.jsonl", "shards/c4.parquet",
                 "data/texts/more", "~/nothere_lowrank_test", str(tmp_path / "missing" / "dir")):
        with pytest.raises(data.DataError, match="dataset path not found") as err:
            data.prepare(name, tokenizer="gpt2", data_dir=str(tmp_path / "cache"))
        assert "\n" not in str(err.value)
    # hub names stay hub names (a dot inside a name is no file extension)
    for name in ("allenai/c4", "roneneldan/TinyStories", "mlfoundations/dclm-baseline-1.0"):
        assert data.is_hub_name(name) and not data.looks_like_path(name)
    (tmp_path / "notes.txt").write_text("an existing file " * 50)  # existing paths are used as they are
    assert data.prepare("notes.txt", tokenizer="bytes", data_dir=str(tmp_path / "cache"), log=lambda *a: None)


def test_docstring_names_real_flags_and_the_cache_key():
    import dataclasses
    import re
    import train
    flags = {f.name for f in dataclasses.fields(train.TrainConfig)}
    named = set(re.findall(r"`--(\w+)", data.__doc__))
    assert named and named <= flags, named - flags
    assert "mtime_ns" in data.__doc__ and "size" in data.__doc__  # the local-source cache key


# ----------------------------------------------------------------------------- shards at scale: streaming, parallel, resumable

def write_corpus(path, n_docs=400, seed=0):
    """A .jsonl corpus of numbered documents of varied length (a few hundred KB)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"text": f"<doc {i}> " + " ".join(f"w{j % 97}" for j in range(rng.integers(50, 400)))}) + "\n")
    return str(path)


def prep(src, data_dir, **kw):
    kw = {"tokenizer": "bytes", "log": lambda *a: None, "val_fraction": 0.25, "shard_tokens": 3 * 4 * 4096, **kw}
    return data.prepare(src, data_dir=str(data_dir), **kw)


def test_shards_are_the_same_stream_for_any_shard_size_and_worker_count(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "c.jsonl")
    monkeypatch.setattr(data, "TEXT_BATCH", 4000)  # many tokenizer tasks
    one = prep(src, tmp_path / "one", shard_tokens=10 ** 9, num_proc=1)  # everything in one chunk
    many = prep(src, tmp_path / "many", num_proc=1)
    meta = json.load(open(os.path.join(many, "meta.json")))
    assert len(meta["shards"]["train"]) > 3 and meta["val_source"] == "every 4th block of 4096 tokens"
    assert {n for _, n in meta["shards"]["train"][:-1]} == {3 * 3 * 4096}  # fixed-size shards
    for split in ("train", "val"):
        assert np.array_equal(np.concatenate(list(data.iter_tokens(one, split))),
                              np.concatenate(list(data.iter_tokens(many, split))))
    a, b = data.TokenData(one, 64, seed=3), data.TokenData(many, 64, seed=3)
    for step in range(30):  # windows that straddle shard boundaries included
        assert torch.equal(a.batch(step, 16, 16)[0], b.batch(step, 16, 16)[0])
    assert torch.equal(a.val_windows(8192), b.val_windows(8192))
    for k in (2, 3):  # worker processes: byte-identical shards
        assert folder_bytes(prep(src, tmp_path / f"p{k}", num_proc=k)) == folder_bytes(many)


def test_a_window_across_a_shard_boundary_is_the_concatenation(tmp_path):
    folder = prep(write_corpus(tmp_path / "c.jsonl"), tmp_path / "d")
    td = data.TokenData(folder, 64)
    whole = np.concatenate(list(data.iter_tokens(folder, "train")))
    edge = int(td.starts["train"][1])
    assert np.array_equal(td.read("train", edge - 10, 30, {}), whole[edge - 10:edge + 20])


class Stop(Exception):
    pass


def interrupted_source(docs, stop_after):
    for i, d in enumerate(docs):
        if i == stop_after:
            raise ConnectionError("the stream dropped")
        yield d


@pytest.mark.parametrize("stop_after", [30, 95, 250, 399])
def test_an_interrupted_preparation_continues_and_ends_byte_identical(tmp_path, monkeypatch, stop_after):
    src = write_corpus(tmp_path / "c.jsonl")
    unbroken = prep(src, tmp_path / "unbroken")
    monkeypatch.setattr(data, "TEXT_BATCH", 4000)
    real = data.local_documents
    monkeypatch.setattr(data, "local_documents", lambda p: interrupted_source(real(p), stop_after))
    with pytest.raises(ConnectionError):
        prep(src, tmp_path / "cut")
    folder = data.shard_folder(src, None, "bytes", str(tmp_path / "cut"), 50_000_000, 0.25)
    assert not os.path.exists(os.path.join(folder, "meta.json"))  # never used for training half-done
    with pytest.raises(data.DataError, match="not a complete token shard folder"):
        data.TokenData(folder, 32)
    progress = os.path.join(folder, "progress.json")
    done = json.load(open(progress))["streams"]["stream"] if os.path.isfile(progress) else {"chunks": 0}
    assert done["chunks"] >= (stop_after > 100)
    monkeypatch.setattr(data, "local_documents", lambda p: interrupted_source(real(p), 10 ** 9))
    seen = []
    monkeypatch.setattr(data, "encode", lambda texts, *a: (seen.extend(texts), real_encode(texts, *a))[1])
    assert prep(src, tmp_path / "cut", num_proc=1) == folder  # one process: `encode` is watched here
    assert folder_bytes(folder) == folder_bytes(unbroken)
    assert not os.path.exists(os.path.join(folder, "progress.json"))
    if done["chunks"]:  # it continued: documents before the last complete chunk are not tokenized again
        assert seen[0].startswith(f"<doc {done['doc']}>") and len(seen) == 400 - done["doc"]


real_encode = data.encode


def test_a_dropped_hub_stream_is_one_line_and_continues(tmp_path, monkeypatch):
    import datasets
    docs = [f"<doc {i}> " + "text " * (50 + i % 300) for i in range(300)]
    drop = {"at": 120}

    def rows(split):
        for i, d in enumerate(docs if split == "train" else docs[:40]):
            if split == "train" and i == drop["at"]:
                raise ConnectionError("Read timed out.\n(more lines)")
            yield {"text": f"{split}: {d}"}

    def fake(name, config=None, split=None, streaming=False):
        return {s: datasets.IterableDataset.from_generator(rows, gen_kwargs={"split": s}) for s in ("train", "validation")}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(data.DataError) as err:
        prep("org/corpus", tmp_path / "a", max_tokens=40_000)
    msg = str(err.value)
    assert "\n" not in msg and "ConnectionError" in msg and "120 documents" in msg and "run again to continue" in msg
    drop["at"] = None
    folder = prep("org/corpus", tmp_path / "a", max_tokens=40_000)
    assert folder_bytes(folder) == folder_bytes(prep("org/corpus", tmp_path / "b", max_tokens=40_000))
    # the hub's own validation split gives the validation tokens
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["val_source"] == "hub split 'validation'" and meta["val_tokens"] == 10_000
    assert meta["train_tokens"] == 30_000
    val = bytes(np.concatenate(list(data.iter_tokens(folder, "val"))).astype(np.uint8))
    train = bytes(np.concatenate(list(data.iter_tokens(folder, "train"))).astype(np.uint8))
    assert val.startswith(b"validation: <doc 0>") and b"validation:" not in train and b"train: <doc 0>" in train
    # --val_split none: blocks of the train stream; a split that does not exist: one line naming the splits
    blocks = json.load(open(os.path.join(prep("org/corpus", tmp_path / "c", max_tokens=40_000, val_split="none"), "meta.json")))
    assert blocks["val_source"].startswith("every 4th block")
    with pytest.raises(data.DataError, match=r"--val_split test: .*\['train', 'validation'\]"):
        prep("org/corpus", tmp_path / "d", max_tokens=40_000, val_split="test")
    with pytest.raises(data.DataError, match="for hub datasets"):
        prep("builtin", tmp_path / "d", val_split="validation")


def test_truncated_or_corrupt_folders_are_one_line_naming_the_file(tmp_path):
    folder = prep(write_corpus(tmp_path / "c.jsonl"), tmp_path / "d")
    shard = os.path.join(folder, "train_00001.bin")
    with open(shard, "r+b") as fh:
        fh.truncate(1000)
    for load in (lambda: data.TokenData(folder, 32), lambda: prep(str(tmp_path / "c.jsonl"), tmp_path / "d")):
        with pytest.raises(data.DataError) as err:
            load()
        assert "train_00001.bin is 1,000 bytes" in str(err.value) and "delete" in str(err.value)
    os.remove(shard)
    with pytest.raises(data.DataError, match="train_00001.bin is missing"):
        data.TokenData(folder, 32)
    open(os.path.join(folder, "meta.json"), "w").write('{"shards": ')
    with pytest.raises(data.DataError, match="meta.json is corrupt"):
        data.TokenData(folder, 32)


def test_a_full_disk_is_one_line_and_the_next_run_continues(tmp_path, monkeypatch):
    import errno
    src = write_corpus(tmp_path / "c.jsonl")
    unbroken = prep(src, tmp_path / "unbroken")
    real_replace, calls = os.replace, {"n": 0}

    def full_after_two_chunks(a, b):  # the third shard rename finds the disk full
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(data.os, "replace", full_after_two_chunks)
    with pytest.raises(data.DataError) as err:
        prep(src, tmp_path / "full")
    assert "\n" not in str(err.value) and "disk full" in str(err.value) and "GB" in str(err.value)
    monkeypatch.setattr(data.os, "replace", real_replace)
    folder = prep(src, tmp_path / "full")
    assert folder_bytes(folder) == folder_bytes(unbroken) and not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_memory_does_not_grow_with_the_token_budget(tmp_path, monkeypatch):
    import tracemalloc
    line = "the quick brown fox jumps over the lazy dog " * 20
    with open(tmp_path / "big.txt", "w") as fh:
        fh.write(line * 6000)  # 5.4 MB: one document, read once
    with open(tmp_path / "big.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": line}) + "\n" for _ in range(6000))
    peaks = []
    for budget in (1_000_000, 5_000_000):
        tracemalloc.start()
        prep(str(tmp_path / "big.jsonl"), tmp_path / f"m{budget}", max_tokens=budget, num_proc=1, shard_tokens=10 ** 6)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0] + 2e6, peaks  # 5x the tokens, not 5x the memory (it was ~2 bytes + 8 per token)


def test_cli_prepares_ahead_and_train_finds_the_same_folder(tmp_path):
    import dataclasses
    import subprocess
    import sys
    import train
    src = write_corpus(tmp_path / "c.jsonl", n_docs=60)
    cmd = [sys.executable, os.path.join(data.__file__), "--dataset", src, "--data_dir", str(tmp_path / "dc"), "--num_proc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip().splitlines()[-1]
    tc = train.TrainConfig(dataset=src, data_dir=str(tmp_path / "dc"))
    assert folder == data.shard_folder(tc.dataset, tc.dataset_config, tc.tokenizer, tc.data_dir, tc.dataset_tokens, tc.val_fraction)
    assert data.read_meta(folder)["train_tokens"] > 0 and "preparing token shards" in proc.stderr
    # the CLI's defaults are train.py's: the same flags name the same folder
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    import argparse
    captured = {}
    real_parse = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = lambda self, argv=None: captured.setdefault("a", real_parse(self, argv)) and (_ for _ in ()).throw(SystemExit(0))
    try:
        with pytest.raises(SystemExit):
            data.main([])
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    for k, v in vars(captured["a"]).items():
        if k in defaults:
            assert defaults[k] == v, k
    bad = subprocess.run([sys.executable, data.__file__, "--dataset", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: dataset path not found")


def test_a_killed_cli_continues_from_its_last_complete_shard(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    rng = np.random.default_rng(0)
    with open(tmp_path / "c.jsonl", "w") as fh:  # ~6 MB
        for i in range(3000):
            fh.write(json.dumps({"text": f"<doc {i}> " + "x" * int(rng.integers(500, 3500))}) + "\n")
    args = ["--dataset", str(tmp_path / "c.jsonl"), "--num_proc", "2", "--shard_tokens", "200000", "--val_fraction", "0.1"]
    cmd = [sys.executable, data.__file__] + args
    ref = subprocess.run(cmd + ["--data_dir", str(tmp_path / "ref")], capture_output=True, text=True, timeout=120)
    folder = os.path.join(str(tmp_path / "cut"), os.path.basename(ref.stdout.strip()))
    proc = subprocess.Popen(cmd + ["--data_dir", str(tmp_path / "cut")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 60:  # kill it once it has written a complete chunk (or it ends first)
        p = os.path.join(folder, "progress.json")
        if os.path.isfile(p) and json.load(open(p))["streams"]["stream"]["chunks"] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_midway = not os.path.isfile(os.path.join(folder, "meta.json"))
    again = subprocess.run(cmd + ["--data_dir", str(tmp_path / "cut")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == folder
    assert folder_bytes(folder) == folder_bytes(ref.stdout.strip())
    assert killed_midway and "continuing at" in again.stderr


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PROGRESS_EVERY", 0.0)
    msgs = []
    prep(write_corpus(tmp_path / "c.jsonl"), tmp_path / "d", log=msgs.append, max_tokens=100_000)
    lines = [m for m in msgs if "tok/s" in m]
    assert lines and "/ 100,000 tokens" in lines[-1] and "ETA" in lines[-1]


def test_concurrent_preparers_wait_for_each_other(tmp_path):
    import threading
    src = write_corpus(tmp_path / "c.jsonl")
    out, msgs = [], []
    threads = [threading.Thread(target=lambda: out.append(prep(src, tmp_path / "d", num_proc=1, log=msgs.append))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] and folder_bytes(out[0]) == folder_bytes(prep(src, tmp_path / "ref"))
    assert sum("preparing token shards" in m for m in msgs) == 1  # one of them tokenized
    waiter = threading.Thread(target=lambda: out.append(data.wait_until_prepared(out[0], poll_s=0.01)))
    os.rename(os.path.join(out[0], "meta.json"), os.path.join(out[0], "m"))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # no meta.json: still waiting
    os.rename(os.path.join(out[0], "m"), os.path.join(out[0], "meta.json"))
    waiter.join(5)
    assert not waiter.is_alive() and out[-1] == out[0]
