"""export.py (Hugging Face folder) and sample.py (sampling, eval-only): against transformers, tiktoken
and train.py's own numbers. transformers is a test-only dependency; those tests skip without it."""

import collections
import json
import os
import struct
import subprocess
import sys

import pytest
import tiktoken
import torch

import export
import sample
from conftest import ROOT
from model import GPT, GPTConfig, save_plain

quiet = lambda *a, **k: None  # noqa: E731


def need_transformers():
    return pytest.importorskip("transformers", reason="needs transformers (test-only: pip install transformers)")


def saved_model(path, tokenizer="bytes", **overrides):
    """A random GPT whose norm gains, eps and theta are not the defaults, written as train.py writes model.pt."""
    cfg = GPTConfig(**{**dict(vocab_size=257, n_layer=2, n_head=4, n_embd=64, intermediate_size=96, max_seq_len=64,
                              norm_eps=1e-5, rope_theta=5000.0, init_std=0.05), **overrides})
    model = GPT(cfg, seed=1).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    save_plain(model, cfg, path, steps=7, tokenizer=tokenizer)
    return model


def hf_logits(folder, x):
    transformers = need_transformers()
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()  # float32, from config.json
    with torch.no_grad():
        return hf(x).logits


# ----------------------------------------------------------------------------- weights


def test_safetensors_writer_follows_the_format(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(6, dtype=torch.float16).view(1, 2, 3)}
    path = str(tmp_path / "t.safetensors")
    export.save_safetensors(tensors, path, {"format": "pt"})
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0  # the data starts 8-byte aligned
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert [header[k]["dtype"] for k in "abc"] == ["F32", "BF16", "F16"]
    end = 0
    for k, t in tensors.items():  # contiguous, in order, covering the whole buffer
        lo, hi = header[k]["data_offsets"]
        assert lo == end and header[k]["shape"] == list(t.shape)
        got = torch.frombuffer(bytearray(raw[8 + n + lo:8 + n + hi]), dtype=t.dtype).view(t.shape)
        assert torch.equal(got, t)
        end = hi
    assert 8 + n + end == len(raw)
    st = pytest.importorskip("safetensors.torch", reason="the reference reader comes with transformers")
    loaded = st.load_file(path)
    assert all(torch.equal(loaded[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("tie", [False, True])
def test_exported_model_pt_gives_the_same_logits_in_transformers(tmp_path, tie):
    model = saved_model(tmp_path / "model.pt", tie_embeddings=tie)
    out = export.export(str(tmp_path / "model.pt"), str(tmp_path / "hf"), log=quiet)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["tie_word_embeddings"], cfg["eos_token_id"], cfg["torch_dtype"]) == \
        (1e-5, 5000.0, tie, 256, "float32")
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(x)
    diff = (hf_logits(out, x) - ours).abs().max().item()
    assert diff <= 1e-5, f"transformers' logits differ by {diff:.3g}"  # in practice 0: the same float32 operations


def test_export_in_bfloat16_rounds_each_weight(tmp_path):
    model = saved_model(tmp_path / "model.pt")
    out = export.export(str(tmp_path / "model.pt"), str(tmp_path / "hf"), dtype="bfloat16", tokenizer=False, log=quiet)
    raw = open(os.path.join(out, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    lo, hi = header["model.layers.1.mlp.up_proj.weight"]["data_offsets"]
    got = torch.frombuffer(bytearray(raw[8 + n + lo:8 + n + hi]), dtype=torch.bfloat16)
    assert torch.equal(got, model.layers[1].mlp.up_proj.weight.detach().bfloat16().flatten())
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    assert not os.path.exists(os.path.join(out, "vocab.json"))  # tokenizer=False


@pytest.mark.parametrize("method", ["relora", "loqt"])
def test_a_method_checkpoint_exports_like_its_model_pt(train_run, data_dir, tmp_path, method):
    """ckpt.pt is rebuilt with train.build, loaded and merged by the method's export(): the weights
    equal the model.pt that train.py wrote from the same model, and eval-only reproduces val_loss."""
    out = train_run("--method", method, *(["--relora", "2", "--scheduler", "cosine"] if method == "relora" else []), save_dir=tmp_path / "run")
    cfg_a, sd_a, tok_a = export.load_any(str(tmp_path / "run" / "ckpt.pt"))
    cfg_b, sd_b, tok_b = export.load_any(str(tmp_path / "run" / "model.pt"))
    assert cfg_a == cfg_b and tok_a == tok_b == "bytes" and sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    got = sample.main([str(tmp_path / "run" / "ckpt.pt"), "--eval", "--data_dir", data_dir, "--eval_tokens", "1024",
                       "--max_length", "32", "--batch_size", "4", "--device", "cpu"], log=quiet)
    assert abs(got["val_loss"] - out["summary"]["val_loss"]) < 1e-5  # merged weights vs the adapter path: rounding only


def test_ckpt_pt_export_loads_in_transformers(train_run, tmp_path):
    train_run("--method", "relora", "--relora", "2", "--scheduler", "cosine", save_dir=tmp_path / "run")  # one merge, then LoRA again
    folder = export.export(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "hf"), log=quiet)
    model, _ = sample.load_model(str(tmp_path / "run" / "model.pt"), torch.device("cpu"))
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(x)
    assert (hf_logits(folder, x) - ours).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- tokenizers


def small_gpt2_style_encoding(n_merges=300):
    """A GPT-2-like tiktoken.Encoding made here (tiktoken.get_encoding("gpt2") needs the network): GPT-2's
    pattern, single bytes ranked in GPT-2's order (not by value), merges learned by BPE on built-in text."""
    import regex
    from tiktoken_ext.openai_public import r50k_pat_str

    import data
    words = collections.Counter(regex.findall(r50k_pat_str, "\n".join(data.builtin_documents())[:60000]))
    u = export.bytes_to_unicode()
    ranks = {bytes([b]): r for r, b in enumerate(sorted(range(256), key=lambda b: ord(u[b])))}
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                pairs[pair] += c
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for s in seqs.values():
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return tiktoken.Encoding(name="mini_gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


TEXTS = ["The meaning of life is 42.", "  leading spaces,\ttabs\n\nand   newlines  ", "naïve café: 日本語 🙂!",
         "don't you're we'll it's", "def f(x):\n    return x ** 2  # comment", "The <|endoftext|> token, then more"]


def check_hf_tokenizer(folder, enc, model_max_length):
    transformers = need_transformers()
    for cls in (transformers.GPT2Tokenizer, transformers.AutoTokenizer):
        tok = cls.from_pretrained(folder)
        assert tok.eos_token_id == enc.eot_token and tok.model_max_length == model_max_length
        for text in TEXTS:
            ids = enc.encode(text, allowed_special="all")
            assert tok(text)["input_ids"] == ids, (cls.__name__, text)
            assert tok.decode(ids) == text


def test_gpt2_style_tokenizer_converts_to_identical_hf_ids(tmp_path):
    enc = small_gpt2_style_encoding()
    assert len(enc.encode_ordinary(TEXTS[0])) < len(TEXTS[0])  # merges are in use
    n_merges = export.tiktoken_to_hf(enc, str(tmp_path), 128)
    assert n_merges == 300
    assert open(tmp_path / "merges.txt").readline() == "#version: 0.2\n"
    check_hf_tokenizer(str(tmp_path), enc, 128)


def test_model_pt_of_a_bpe_run_exports_its_tokenizer(tmp_path, monkeypatch):
    enc = small_gpt2_style_encoding(n_merges=40)
    monkeypatch.setattr(export, "load_tokenizer", lambda name: enc if name == "mini_gpt2" else pytest.fail(name))
    saved_model(tmp_path / "model.pt", tokenizer="mini_gpt2", vocab_size=enc.n_vocab)
    folder = export.export(str(tmp_path / "model.pt"), str(tmp_path / "hf"), log=quiet)
    assert json.load(open(os.path.join(folder, "config.json")))["eos_token_id"] == enc.eot_token
    check_hf_tokenizer(folder, enc, 64)


def test_byte_tokenizer_exports_as_one_id_per_byte(tmp_path):
    import data
    saved_model(tmp_path / "model.pt")
    folder = export.export(str(tmp_path / "model.pt"), str(tmp_path / "hf"), log=quiet)
    enc = data.byte_tokenizer()
    assert enc.encode_ordinary("héllo") == list("héllo".encode())
    check_hf_tokenizer(folder, enc, 64)


def test_recover_merge_rejects_an_unreachable_token():
    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256}  # "abc" without "ab" or "bc"
    with pytest.raises(ValueError, match="not a merge of lower-ranked tokens"):
        export.recover_merge(b"abc", ranks)


# ----------------------------------------------------------------------------- sampling and eval-only


def test_sample_continues_the_prompt_deterministically(tmp_path):
    model = saved_model(tmp_path / "model.pt")
    args = [str(tmp_path / "model.pt"), "--prompt", "The meaning of", "--max_new_tokens", "20", "--device", "cpu"]
    a = sample.main(args + ["--seed", "0"], log=quiet)
    b = sample.main(args + ["--seed", "0"], log=quiet)
    c = sample.main(args + ["--seed", "1"], log=quiet)
    assert a == b != c and a[0].startswith("The meaning of")
    greedy = sample.main(args + ["--temperature", "0"], log=quiet)[0]
    ids = model.generate(torch.tensor([[256] + list(b"The meaning of")]), 20, temperature=0)[0, 1:]
    assert greedy == bytes(ids.tolist()).decode("utf-8", errors="replace")


def test_eval_only_equals_the_val_loss_train_reported(train_run, data_dir, tmp_path):
    summary = train_run("--method", "full", save_dir=tmp_path / "run")["summary"]
    args = ["--eval", "--dataset", "builtin", "--data_dir", data_dir, "--eval_tokens", "1024", "--max_length", "32",
            "--batch_size", "4", "--device", "cpu"]
    out = sample.main([str(tmp_path / "run" / "model.pt")] + args, log=quiet)
    assert abs(out["val_loss"] - summary["val_loss"]) < 1e-6 and out["tokens"] == 1024
    assert abs(out["val_ppl"] - summary["val_ppl"]) < 1e-4
    again = sample.main([str(tmp_path / "run" / "ckpt.pt")] + args, log=quiet)  # the same through the method path
    assert abs(again["val_loss"] - summary["val_loss"]) < 1e-6


def one_line_error(capsys, entry, argv):
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys, data_dir):
    missing, text = str(tmp_path / "nope.pt"), tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    assert "checkpoint not found" in one_line_error(capsys, sample.cli, [missing])
    assert "checkpoint not found" in one_line_error(capsys, export.cli, [missing, str(tmp_path / "hf")])
    assert "not a readable checkpoint" in one_line_error(capsys, sample.cli, [str(text)])
    assert "holds no 'model' state dict" in one_line_error(capsys, export.cli, [str(tmp_path / "other.pt"), str(tmp_path / "hf")])
    saved_model(tmp_path / "v300.pt", vocab_size=300)  # says "bytes", but has 300 tokens
    err = one_line_error(capsys, sample.cli, [str(tmp_path / "v300.pt"), "--eval", "--data_dir", data_dir, "--max_length", "32"])
    assert "vocabulary of 257, the model 300" in err
    assert "257 tokens, the model 300" in one_line_error(capsys, sample.cli, [str(tmp_path / "v300.pt")])
    assert "exceeds the model's max_seq_len 64" in one_line_error(
        capsys, sample.cli, [str(tmp_path / "v300.pt"), "--eval", "--data_dir", data_dir])
    sd = torch.load(tmp_path / "v300.pt", weights_only=True)
    del sd["model"]["norm.weight"]
    torch.save(sd, tmp_path / "cut.pt")
    assert "missing norm.weight" in one_line_error(capsys, export.cli, [str(tmp_path / "cut.pt"), str(tmp_path / "hf")])


def test_the_sample_command_runs_as_documented(tmp_path):  # export.py's command line is export.cli, tested above
    saved_model(tmp_path / "model.pt")
    proc = subprocess.run([sys.executable, "sample.py", str(tmp_path / "model.pt"), "--prompt", "Hi", "--max_new_tokens", "5",
                           "--temperature", "0.8", "--top_k", "50", "--seed", "0"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.startswith("Hi"), proc.stderr
