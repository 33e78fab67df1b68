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
