"""
Sample from a trained model, or evaluate it, without training.

    python sample.py out/full/model.pt --prompt "The meaning of" --max_new_tokens 200 --temperature 0.8 --top_k 50 --seed 0
    python sample.py out/relora/ckpt.pt --prompt "def "            # a method checkpoint works too
    python sample.py out/full/model.pt --eval --dataset builtin    # validation loss and perplexity
    python sample.py out/full/model.pt --eval --dataset builtin --eval_tokens 65536 --max_length 128 --data_dir data_cache

The file is read by export.load_any: a model.pt (the plain model written at the end of a run) or a
method's ckpt.pt (rebuilt as train.py builds it and merged by the method's export()). The tokenizer
is the one the file names (older files without that field: `bytes` for a 257-token vocabulary,
`gpt2` for 50257); --tokenizer overrides it. The prompt follows an end-of-text token, as each
document follows one in the training stream (train.py's end-of-run sample starts there too).

--eval scores the model on the fixed validation windows of a dataset (data.prepare, then
TokenData.val_windows, then train.evaluate): with the run's --dataset, --dataset_tokens,
--val_fraction, --max_length, --eval_tokens, --batch_size and --dtype (train.py's defaults here),
it prints the val_loss that train.py reported at the end of that run.
"""

import argparse
import contextlib
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import data as data_lib  # noqa: E402
import runfiles  # noqa: E402
import train  # noqa: E402
from export import load_any, load_tokenizer  # noqa: E402
from model import GPT  # noqa: E402

TC = train.TrainConfig  # its defaults are the evaluation defaults, so --eval matches a default run


def load_model(path, device, dtype=torch.float32):
    """-> (GPT in eval mode on `device`, tokenizer name). Built on the meta device, then filled
    tensor by tensor from the file: the random init never exists."""
    cfg, sd, tokenizer = load_any(path)
    with torch.device("meta"):
        model = GPT(cfg)
    model.plan(device, dtype, sd).materialize()
    return model.plan(None).eval(), tokenizer


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def autocast_for(device, dtype):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


def sample(model, enc, prompt, max_new_tokens, temperature, top_k, seed, device, autocast):
    """The prompt and its continuation, as text."""
    ids = [enc.eot_token] + enc.encode_ordinary(prompt)
    if len(ids) > model.config.max_seq_len:
        raise ValueError(f"the prompt is {len(ids) - 1} tokens, more than the model's max_seq_len {model.config.max_seq_len}")
    idx = torch.tensor([ids], device=device)
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                             generator=torch.Generator(device).manual_seed(seed))
    return enc.decode_bytes(out[0, 1:].tolist()).decode("utf-8", errors="replace")


def evaluate(model, tokenizer, args, device, autocast, log=print):
    """{"val_loss", "val_ppl", "tokens"} on the dataset's fixed validation windows."""
    if args.max_length > model.config.max_seq_len:
        raise ValueError(f"--max_length {args.max_length} exceeds the model's max_seq_len {model.config.max_seq_len}")
    folder = data_lib.prepare(args.dataset, args.dataset_config, tokenizer, args.data_dir, args.dataset_tokens,
                              args.val_fraction, log=log)
    data = data_lib.TokenData(folder, args.max_length)
    if data.vocab_size != model.config.vocab_size:
        raise ValueError(f"dataset '{args.dataset}' tokenized with '{data.meta['tokenizer']}' has a vocabulary of "
                         f"{data.vocab_size}, the model {model.config.vocab_size}; pass the model's --tokenizer")
    windows = data.val_windows(args.eval_tokens)
    loss = train.evaluate(model, windows, args.batch_size, device, autocast)
    model.eval()  # train.evaluate leaves the model in train mode
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "tokens": windows[:, 1:].numel()}


def main(argv=None, log=print):
    p = argparse.ArgumentParser(description="Sample from or evaluate a model.pt / ckpt.pt without training")
    p.add_argument("path", help="model.pt or a method's ckpt.pt written by train.py")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer the file names (bytes, gpt2, ...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype under autocast: auto | float32 | bfloat16 | float16",
                   choices=["auto", "float32", "bfloat16", "float16"])
    e = p.add_argument_group("--eval: validation loss, as train.py computes it")
    e.add_argument("--eval", action="store_true", help="print val_loss and val_ppl instead of sampling")
    for name in ("dataset", "dataset_config", "data_dir", "dataset_tokens", "val_fraction", "max_length",
                 "eval_tokens", "batch_size"):
        f = TC.__dataclass_fields__[name]
        e.add_argument("--" + name, type=type(f.default) if f.default is not None else str, default=f.default,
                       help=f"{f.metadata['help']} (default: {f.default})")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.path, device)
    tokenizer = args.tokenizer or tokenizer
    autocast = autocast_for(device, args.dtype)
    if args.eval:
        out = evaluate(model, tokenizer, args, device, autocast, log=log)
        log(f"{args.path} on {args.dataset} ({tokenizer}): val_loss {out['val_loss']:.4f} | val_ppl {out['val_ppl']:.2f} "
            f"| {out['tokens']:,} tokens in windows of {args.max_length}")
        return out
    enc = load_tokenizer(tokenizer)
    if enc.n_vocab != model.config.vocab_size:
        raise ValueError(f"tokenizer '{tokenizer}' has {enc.n_vocab} tokens, the model {model.config.vocab_size}; "
                         "pass the model's --tokenizer")
    texts = [sample(model, enc, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed + i,
                    device, autocast) for i in range(args.num_samples)]
    log(("\n" + "-" * 40 + "\n").join(texts))
    return texts


def cli(argv=None):
    runfiles.run_cli(main, (ValueError, OSError, train.TrainingError), argv)


if __name__ == "__main__":
    cli()
