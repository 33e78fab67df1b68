"""
Export a trained model to the Hugging Face LLaMA format: a folder that
`transformers.LlamaForCausalLM.from_pretrained(folder)` loads with the same logits.

    python export.py out/full/model.pt hf_out/            # the plain model.pt written at the end of a run
    python export.py out/relora/ckpt.pt hf_out/           # a method checkpoint: adapters merged by its export()
    python export.py out/full/model.pt hf_out/ --dtype bfloat16

The folder holds
  config.json         LlamaConfig: sizes, rms_norm_eps, rope_theta, tie_word_embeddings, bos/eos ids
  model.safetensors   HF names (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...,
                      model.norm.weight, lm_head.weight), written here without the safetensors package
  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                      a GPT2Tokenizer with exactly the ids of the run's tiktoken tokenizer (--no_tokenizer: none)

The tensors need no permutation: model.py already uses HF's rotate-half RoPE layout and HF's module
names. A method's ckpt.pt is rebuilt the way train.py builds it (train.build with the checkpoint's
own train and method configs, on the CPU), loaded, and turned into a plain state dict by the
method's `export(model, cfg)`; `method_state` (candidate pools, per-rank copies) is training state
and is not needed for that. `load_any(path)` does this for sample.py too.

Tokenizers. tiktoken's GPT-2 BPE becomes vocab.json + merges.txt: each token's bytes are written
through GPT-2's byte-to-unicode table, and each multi-byte token's merge is recovered by running BPE
on its bytes with the lower ranks only (it ends in exactly two parts). The `bytes` tokenizer of the
built-in corpus (ids 0-255 are the UTF-8 bytes, 256 is <|endoftext|>) is written the same way with
no merges, so GPT2Tokenizer gives one id per byte, equal to the byte. Its limits: 257 tokens, one
per byte, so a character outside ASCII is 2-4 tokens, the model's context of max_seq_len tokens is
that many bytes, and its loss and perplexity are per byte, not comparable with those of a BPE
model. Without transformers, encode with `list(text.encode("utf-8"))` (prefix 256 to start a
document, as training did) and decode with `bytes(ids).decode("utf-8", errors="replace")`.
Other tiktoken encodings convert only if they use GPT-2's pre-tokenization pattern.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import struct
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import data as data_lib  # noqa: E402
import runfiles  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# GPT-2's pre-tokenization, as released and as tiktoken writes it (same splits)
GPT2_PATTERNS = {r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""}
with contextlib.suppress(ImportError):
    from tiktoken_ext.openai_public import r50k_pat_str
    GPT2_PATTERNS.add(r50k_pat_str)
KNOWN_VOCABS = {257: "bytes", 50257: "gpt2"}  # the tokenizer of a file that does not name one

# ----------------------------------------------------------------------------- loading


def load_any(path):
    """A model.pt or a method's ckpt.pt written by train.py -> (GPTConfig, plain state dict, tokenizer name).

    Every problem is a one-line ValueError (FileNotFoundError for a missing file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                         "expected a model.pt or ckpt.pt written by train.py") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ValueError(f"{path} holds no 'model' state dict; expected a model.pt or ckpt.pt written by train.py")
    if "config" in obj:  # model.pt
        try:
            cfg = GPTConfig(**obj["config"])
        except TypeError as e:
            raise ValueError(f"{path}: its 'config' does not fit this model.py ({e})") from None
        sd = obj["model"]
    elif "train_config" in obj:  # ckpt.pt
        cfg, sd = export_checkpoint(obj, path)
    else:
        raise ValueError(f"{path} has neither 'config' (model.pt) nor 'train_config' (ckpt.pt)")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    why = train.mismatch(expected, {k: getattr(v, "shape", ()) for k, v in sd.items()}, "the file")
    if why:
        raise ValueError(f"{path}: the weights do not fit its own config: {why}")
    tokenizer = obj.get("tokenizer") or obj.get("train_config", {}).get("tokenizer", "auto")
    if tokenizer == "auto":  # an old model.pt, or a ckpt.pt of a run with --tokenizer auto
        tokenizer = KNOWN_VOCABS.get(cfg.vocab_size, "bytes")
    return cfg, sd, tokenizer


def export_checkpoint(ck, path):
    """Rebuild a method's model as train.py does, load ckpt.pt into it, merge with the method's export()."""
    saved, known = ck["train_config"], {f.name for f in dataclasses.fields(train.TrainConfig)}
    tc = train.TrainConfig(**{k: v for k, v in saved.items() if k in known})
    tc.device, tc.rank, tc.world_size, tc.compile = "cpu", 0, 1, False
    tc.per_layer_updates, tc.warmed_up_model = False, None  # the checkpoint holds every weight
    emb = ck["model"].get("embed_tokens.weight")
    if emb is None:
        raise ValueError(f"{path} has no embed_tokens.weight, so its vocabulary is unknown")
    try:
        method = train.load_method(tc.method)
        fields = {f.name for f in dataclasses.fields(method.Config)}
        mc = method.Config(**{k: v for k, v in ck.get("method_config", {}).items() if k in fields})
        run = train.Run(tc, method, mc, torch.device("cpu"), contextlib.nullcontext(), log=lambda *a, **k: None)
        train.build(run, emb.shape[0])
    except (train.TrainingError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"{path}: cannot rebuild its {tc.method} model: {e}") from None
    model = run.model
    why = train.mismatch({k: v.shape for k, v in model.state_dict().items()},
                         {k: v.shape for k, v in ck["model"].items()}, "the checkpoint")
    if why:
        raise ValueError(f"{path} does not fit the {tc.method} model its own configs build: {why}")
    model.load_state_dict(ck["model"])
    model.eval()
    sd = method.export(model, mc) if hasattr(method, "export") else model.state_dict()
    return model.config, sd


# ----------------------------------------------------------------------------- weights


def hf_config(cfg: GPTConfig, dtype=torch.float32, eot_token=None):
    """config.json for transformers' LlamaForCausalLM (rope_theta for v4, rope_parameters for v5)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.n_embd // cfg.n_head, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_token, "eos_token_id": eot_token, "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }


def hf_state_dict(sd, cfg: GPTConfig, dtype=torch.float32):
    """model.py names -> HF names: `model.` before everything but lm_head (dropped when tied)."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[name if name == "lm_head.weight" else "model." + name] = t.detach().to("cpu", dtype).contiguous()
    return out


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors, path, metadata=None):
    """The safetensors format: u64 little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw bytes in order."""
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():  # one tensor in memory at a time
            fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer


def bytes_to_unicode():
    """GPT-2's table byte -> printable character: printable Latin-1 bytes map to themselves, the
    other 68 (controls, space, ...) to the characters 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def recover_merge(token, ranks):
    """The pair whose merge made `token`: BPE on its bytes with the ranks below its own."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if ranks.get(a + b, limit) < limit]
        if not pairs:
            raise ValueError(f"token {token!r} (rank {limit}) is not a merge of lower-ranked tokens")
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_to_hf(enc, out_dir, model_max_length):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for GPT2Tokenizer,
    giving the ids of `enc.encode(text, allowed_special="all")`."""
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    multi = sorted((r, b) for b, r in ranks.items() if len(b) > 1)
    if multi and getattr(enc, "_pat_str", None) not in GPT2_PATTERNS:
        raise ValueError(f"tokenizer '{enc.name}' splits text with a pattern other than GPT-2's; "
                         "GPT2Tokenizer cannot reproduce it (use --no_tokenizer)")
    u = bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    vocab = {text(b): r for b, r in ranks.items()}
    specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
    vocab.update(specials)
    merges = [" ".join(text(p) for p in recover_merge(b, ranks)) for _, b in multi]
    eot = next((s for s, i in specials.items() if i == enc.eot_token), None)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), fh, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special_map = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as fh:
        json.dump(special_map, fh, indent=1)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "GPT2Tokenizer", **special_map, "add_prefix_space": False,
                   "add_bos_token": False, "errors": "replace", "model_max_length": model_max_length,
                   "clean_up_tokenization_spaces": False}, fh, indent=1)
    return len(merges)


def load_tokenizer(name):
    """The tiktoken Encoding named in a model.pt; one-line error when it cannot be had (offline)."""
    if name == "bytes":
        return data_lib.byte_tokenizer()
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"cannot load the tiktoken tokenizer '{name}' ({type(e).__name__}); tiktoken "
                         "downloads it once and caches it, so run once with network access") from None


# ----------------------------------------------------------------------------- main


def export(src, out_dir, dtype="float32", tokenizer=True, log=print):
    """Write the HF folder for `src` (model.pt or ckpt.pt) into out_dir; returns out_dir."""
    cfg, sd, tok_name = load_any(src)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        enc = load_tokenizer(tok_name) if tokenizer else None  # before writing anything
    except ValueError as e:
        raise ValueError(f"{e}; or export the weights alone with --no_tokenizer") from None
    if enc is not None and enc.n_vocab != cfg.vocab_size:
        raise ValueError(f"{src}: tokenizer '{tok_name}' has {enc.n_vocab} tokens but the model {cfg.vocab_size}")
    eot = enc.eot_token if enc is not None else {"bytes": 256, "gpt2": 50256}.get(tok_name)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {out_dir} ({e.strerror})") from None
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config(cfg, torch_dtype, eot), fh, indent=1)
    save_safetensors(hf_state_dict(sd, cfg, torch_dtype), os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
    n_merges = tiktoken_to_hf(enc, out_dir, cfg.max_seq_len) if enc is not None else None
    log(f"exported {src} ({cfg.n_layer} layers, hidden {cfg.n_embd}, vocab {cfg.vocab_size}, {dtype}) to {out_dir}"
        + (f" with the '{tok_name}' tokenizer ({n_merges} merges)" if enc is not None else " without a tokenizer"))
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a model.pt or ckpt.pt to a Hugging Face LLaMA folder")
    p.add_argument("src", help="model.pt or a method's ckpt.pt written by train.py")
    p.add_argument("out_dir", help="folder for config.json, model.safetensors and the tokenizer files")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    p.add_argument("--no_tokenizer", action="store_true", help="write no tokenizer files")
    args = p.parse_args(argv)
    return export(args.src, args.out_dir, args.dtype, tokenizer=not args.no_tokenizer)


def cli(argv=None):
    runfiles.run_cli(main, (ValueError, OSError), argv)  # OSError: an unwritable out_dir, a full disk


if __name__ == "__main__":
    cli()
