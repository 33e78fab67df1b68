"""
The training driver: one LLaMA model, one data pipeline, any method.

    python train.py                                   # full-rank `tiny` on the built-in corpus (~1-2 min, CPU)
    python train.py --method relora --help            # a method's own flags are listed under its name
    torchrun --standalone --nproc-per-node 2 train.py # DDP on one node: NCCL on GPUs, gloo on CPU
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 train.py --autoresume  # a crashed rank: resume
    python train.py --model_config llama_60m --dataset allenai/c4 --dataset_config en \
        --max_length 256 --batch_size 64 --total_batch_size 512 --dtype bfloat16 --compile

Outputs in --save_dir (default out/<method>): config.json, metrics.jsonl, summary.json,
ckpt.pt (resume with --autoresume), model.pt (a plain model.py state dict) and loss.png.
main() reads as five stages: setup (device, DDP, data), build (model, method, optimizer),
resume, the loop of train_step() with evaluation and checkpoints, and finish.

The method seam
---------------
`--method NAME` imports NAME.py. train.py never branches on the name: it looks up these entry
points in the module and falls back to the defaults when one is missing.

  Config                                   dataclass (required). Its fields become flags; a field's
                                           metadata may hold "help", "aliases" and "choices".
  TRAIN_DEFAULTS                           dict: the method's own defaults for train.py flags.
  EVENT_EVERY_UPDATE                       dict of Config (or TrainConfig) values that make the periodic
                                           event fire at every update (bench.py --memory measures it).
  wrap(model, cfg, train)                  in-place surgery before compile and DDP. The GPT arrives
                                           built on the meta device (nothing allocated): call
                                           `model.materialize(name)` on each layer just before replacing
                                           it, so one layer at a time exists in full precision.
  make_optimizer(model, cfg, train)        -> optimizer. Default: AdamW over trainable parameters.
  lr_multiplier(step, cfg, train)          -> float, or None for train.py's --scheduler.
  step_start(step, model, cfg, train)      before the first forward of update `step` (e.g. "produce
                                           dL/dW on this step": GoLore, LoQT).
  before_step(step, model, opt, cfg, train) -> dict. After backward (gradients reduced across ranks
                                           and unscaled), before clipping and opt.step() (SwitchLoRA).
  after_step(step, model, opt, cfg, train)  -> dict. After opt.step() (merges, resets, refreshes).
  param_step(step, p, model, opt, cfg, train)  --per_layer_updates only: runs when p's gradient is
                                           complete, before train.py steps the parameters that have a
                                           gradient; a method with before_step needs it for that mode.
  get_state(model, opt, cfg) / set_state(model, opt, cfg, state)   extra checkpointed state.
  export(model, cfg) -> state dict         a plain GPT state dict on the CPU (adapters merged,
                                           weights dequantized). Default: model.state_dict().
  use_ddp(cfg, train) -> bool              False: no DDP wrapper; the method communicates itself.

`step` is the 0-based update. `train` is the TrainConfig below, with rank, world_size, grad_accum
and device filled in. Hooks run on every rank with the unwrapped model; the dicts they return
(floats or 0-dim tensors) are logged as `method/<key>`. Hooks must run under fake tensors
(bench.py --memory): no .item(), int() or bool() on model data inside them. The global RNG is
reseeded at every update from (seed, step, rank); randomness that must agree across ranks comes
from a generator seeded with (seed, step). Gradients sync on the last micro-step only.
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import data as data_lib  # noqa: E402
from model import GPT, count_params_formula, get_config, save_plain  # noqa: E402
from runfiles import (TrainingError, atomic_save, crash_for_test, end_process_group, folder_lock, git_commit,  # noqa: E402,F401
                      load_checkpoint, mismatch, plot_losses, run_cli, start_process_group, start_wandb)


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    method: str = opt("full", "method file to load: full, relora, switchlora, golore, lte, loqt")
    # model and data
    model_config: str = opt("tiny", "preset name (tiny, llama_9m ... llama_13b) or a JSON config file")
    dataset: str = opt("builtin", "builtin | a local .txt/.jsonl/.parquet file or folder | a hub dataset owner/name")
    dataset_config: str = opt(None, "hub dataset config, e.g. en for allenai/c4")
    tokenizer: str = opt("auto", "auto (gpt2 for hub data, bytes otherwise) | bytes | gpt2 | any tiktoken name")
    data_dir: str = opt("data_cache", "where token shards are written and reused")
    dataset_tokens: int = opt(50_000_000, "token budget read from the source")
    val_fraction: float = opt(0.05, "fraction of the token stream held out for validation")
    val_split: str = opt("auto", "hub split used for validation: auto (the hub's validation split when it exists, else a "
                                 "block split of the training stream) | none (block split) | a split name")
    num_proc: int = opt(0, "tokenizer worker processes for preparing shards (0: every core)")
    max_length: int = opt(128, "tokens per training window")
    # batch and optimisation
    batch_size: int = opt(16, "sequences per micro-batch per device")
    total_batch_size: int = opt(0, "sequences per update over all micro-steps and ranks (0: batch_size x ranks)")
    lr: float = opt(2e-3, "peak learning rate (full-rank's best on tiny in the README's LR sweep; a method file may set its own)")
    warmup_steps: int = opt(50, "linear warmup steps", aliases=["--warmup"])
    num_training_steps: int = opt(500, "number of optimizer updates")
    scheduler: str = opt("cosine", "cosine | linear | constant (relora adds cosine_restarts)")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of --lr")
    weight_decay: float = opt(0.0, "AdamW weight decay on 2-D tensors")
    matrix_lr_ratio: float = opt(1.0, "full-rank only: LR of the transformer blocks' weight matrices (the ones the "
                                      "low-rank methods reparametrise) as a fraction of --lr; embeddings, head and "
                                      "norms keep --lr")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon (GaLore-lineage repos use 1e-6)", aliases=["--adamw_eps"])
    grad_clipping: float = opt(1.0, "clip the global gradient norm (0: off)")
    per_layer_updates: bool = opt(False, "step each parameter as soon as its gradient is complete and free the "
                                         "gradient (the originals' *_per_layer optimizers); needs --grad_clipping 0, "
                                         "no gradient accumulation and one process")
    # system
    dtype: str = opt("auto", "compute dtype under autocast: auto (bfloat16 on a bf16 GPU, else float32) | float32 | bfloat16 | float16")
    storage_dtype: str = opt("float32", "dtype the weights are stored in: float32 (masters, autocast to --dtype) | "
                                        "bfloat16 (the originals' pure bf16 model; see each method for what stays float32)",
                             choices=["float32", "bfloat16"])
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward "
                                                "(torch.utils.checkpoint, non-reentrant, RNG state preserved): less "
                                                "activation memory for about one more forward")
    dist_timeout: int = opt(1800, "seconds a DDP collective may wait (init_process_group's timeout)")
    seed: int = opt(0, "seeds the model init, the data order and every method event")
    # evaluation, logging, checkpoints
    eval_every: int = opt(100, "validate every N updates (and at the end); 0: only at the end")
    eval_tokens: int = opt(65536, "validation tokens (fixed windows: every method sees the same ones)")
    log_every: int = opt(10, "print and record train metrics every N updates (and at the end); 0: only at the end")
    save_every: int = opt(250, "checkpoint every N updates (and at the end); 0: only at the end")
    save_dir: str = opt(None, "output folder (default: out/<method>)")
    autoresume: bool = opt(False, "continue from save_dir/ckpt.pt if it exists")
    warmed_up_model: str = opt(None, "start from a plain model.pt (e.g. a full-rank warm-up for ReLoRA)")
    stop_at_step: int = opt(0, "stop as if interrupted after N updates, with a checkpoint (0: off)")
    sample_tokens: int = opt(200, "length of the text sample printed at the end (0: none)")
    check_ranks_every: int = opt(0, "under DDP, assert every N updates that all ranks hold identical weights")
    wandb: bool = opt(False, "also log every metrics.jsonl record to Weights & Biases (WANDB_MODE=offline: no network)")
    wandb_project: str = opt("lowrank-pretraining", "W&B project")
    wandb_run_name: str = opt(None, "W&B run name (default: the --save_dir folder name)")
    # filled in at run time, not flags
    offload_device: str = field(default="cpu", metadata={"cli": False})  # where methods offload tensors to
    rank: int = field(default=0, metadata={"cli": False})
    world_size: int = field(default=1, metadata={"cli": False})
    grad_accum: int = field(default=1, metadata={"cli": False})
    data_step_offset: int = field(default=0, metadata={"cli": False})


USER_ERRORS = (TrainingError, ValueError, FileNotFoundError)
CORE_FILES = {"model", "data", "train", "runfiles", "bench", "sweep", "memory", "sample", "export", "setup", "conftest"}
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports it

# ----------------------------------------------------------------------------- command line


def available_methods():
    return sorted(f[:-3] for f in os.listdir(HERE)
                  if f.endswith(".py") and f[:-3] not in CORE_FILES and "class Config" in open(os.path.join(HERE, f)).read())


def load_method(name):
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name or "") or name not in available_methods():
        raise TrainingError(f"unknown method '{name}'; available: {', '.join(available_methods())}")
    return importlib.import_module(name)


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{s}'")


def add_dataclass_flags(parser, dc, title):
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(dc):
        if not f.metadata.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = ["--" + f.name] + list(f.metadata.get("aliases", []))
        help_ = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
        if isinstance(default, bool):
            group.add_argument(*names, dest=f.name, nargs="?", const=True, default=default, type=str2bool, help=help_)
            group.add_argument("--no_" + f.name, dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            typ = type(default) if default is not None else str
            group.add_argument(*names, dest=f.name, type=typ, default=default, choices=f.metadata.get("choices"), help=help_)


def parse_args(argv=None):
    """-> (TrainConfig, method module, method Config)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="full")
    method = load_method(pre.parse_known_args(argv)[0].method)
    clash = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(method.Config)}
    assert not clash, f"{method.__name__}.Config redefines train.py flags: {clash}"
    parser = argparse.ArgumentParser(description="Low-rank pre-training driver (see the docstring of train.py)")
    add_dataclass_flags(parser, TrainConfig, "training")
    add_dataclass_flags(parser, method.Config, f"method: {method.__name__}")
    parser.set_defaults(**getattr(method, "TRAIN_DEFAULTS", {}))  # e.g. a method's own default --lr
    ns = vars(parser.parse_args(argv))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in ns.items() if k in train_keys})
    mc = method.Config(**{k: v for k, v in ns.items() if k not in train_keys})
    if tc.save_dir is None:
        tc.save_dir = os.path.join("out", tc.method)
    return tc, method, mc


# ----------------------------------------------------------------------------- pieces of the loop


def lr_schedule(step, tc):
    """LR multiplier: linear warmup t/w, then cosine (or linear) decay to min_lr_ratio (ReLoRA's `cosine`)."""
    w, T, rho = tc.warmup_steps, tc.num_training_steps, tc.min_lr_ratio
    if tc.scheduler == "constant":
        return 1.0 if step >= w else step / max(1, w)
    if step < w:
        return step / w
    progress = min(1.0, (step - w) / max(1, T - w))
    if tc.scheduler == "cosine":
        return rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * progress))
    if tc.scheduler == "linear":
        return rho + (1 - rho) * (1 - progress)
    raise TrainingError(f"unknown --scheduler '{tc.scheduler}' for method {tc.method}; use cosine, linear or constant")


def default_optimizer(model, tc):
    """AdamW over trainable parameters; weight decay on matrices only (nanoGPT). --matrix_lr_ratio scales
    the LR of the blocks' matrices alone (a per-layer LR experiment for full-rank training)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # a group of their own only when scaled: checkpoints of ordinary runs keep the two-group layout
    scaled = {n for n, p in named if p.dim() >= 2 and n.startswith("layers.")} if tc.matrix_lr_ratio != 1.0 else set()
    groups = [{"params": [p for n, p in named if n in scaled], "weight_decay": tc.weight_decay,
               "lr": tc.lr * tc.matrix_lr_ratio},
              {"params": [p for n, p in named if p.dim() >= 2 and n not in scaled], "weight_decay": tc.weight_decay},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr,
                             betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)


@torch.no_grad()
def evaluate(model, windows, batch_size, device, autocast, rank=0, world=1):
    """Per-token mean loss over fixed windows; ranks split the windows and sum their results."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of tokens)
    mine = windows[rank::world]
    for i in range(0, len(mine), batch_size):
        xy = mine[i:i + batch_size].to(device)
        with autocast:
            logits, _ = model(xy[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(xy[:, 1:].numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def fingerprint(model):
    """One float64 number per state tensor (sum of squares + sum): parameters, buffers, integer codes too."""
    return torch.stack([t.detach().double().pow(2).sum() + t.detach().double().sum()
                        for t in model.state_dict().values() if not t.is_complex()]).cpu()


def assert_ranks_agree(model, step):
    """Every rank holds bit-identical parameters and buffers (their fingerprints are equal)."""
    fp = fingerprint(model)
    gathered = [torch.zeros_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fp)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise TrainingError(f"ranks disagree on the model weights after update {step + 1}")


def state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB -> bytes


# ----------------------------------------------------------------------------- the stages


@dataclass
class Run:
    """What a training run holds between updates: made by setup() and build(), advanced by train_step()."""
    tc: TrainConfig
    method: Any
    mc: Any
    device: torch.device
    autocast: Any
    scaler: Any = None
    data: Any = None
    model: Any = None  # the raw GPT, wrapped by the method: what hooks, checkpoints and evaluation see
    forward: Any = None  # what batches go through: the model, compiled and/or wrapped in DDP
    optimizer: Any = None
    records: list = field(default_factory=list)
    step: int = 0  # the update in progress (per-layer hooks read it)
    log: Any = print

    def hook(self, name):
        return getattr(self.method, name, None)


def setup(tc, method, mc):
    """Device, DDP and precision -> a Run without data or model yet."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        tc.rank, tc.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if tc.device == "auto":
        tc.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {tc.device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
    if tc.device == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps: MPS is not available here; use --device cpu")
    if ddp and tc.device.startswith("cuda"):
        tc.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(tc.device)
    if ddp and tc.dist_timeout < 1:
        raise TrainingError(f"--dist_timeout must be at least 1 second, got {tc.dist_timeout}")
    if ddp and not dist.is_initialized():  # on keys of this torchrun attempt's own (see runfiles)
        start_process_group("nccl" if tc.device.startswith("cuda") else "gloo", tc.dist_timeout)
        if tc.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // tc.world_size))
    device = torch.device(tc.device)
    if tc.dtype == "auto":
        tc.dtype = "bfloat16" if tc.storage_dtype == "bfloat16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()) else "float32"
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(tc.dtype, "?")
    if amp_dtype == "?":
        raise TrainingError(f"unknown --dtype '{tc.dtype}'")
    if tc.storage_dtype == "bfloat16" and amp_dtype != torch.bfloat16:
        raise TrainingError(f"--storage_dtype bfloat16 computes in bfloat16: drop --dtype {tc.dtype}")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    log = print if tc.rank == 0 else (lambda *a, **k: None)
    return Run(tc, method, mc, device, autocast, scaler, log=log)


def check_geometry(tc):
    if tc.batch_size < 1:
        raise TrainingError(f"--batch_size must be at least 1, got {tc.batch_size}")
    if tc.total_batch_size == 0:
        tc.total_batch_size = tc.batch_size * tc.world_size
    if tc.total_batch_size % (tc.batch_size * tc.world_size):
        raise TrainingError(f"--total_batch_size {tc.total_batch_size} must be a multiple of --batch_size "
                            f"{tc.batch_size} x {tc.world_size} rank(s)")
    tc.grad_accum = tc.total_batch_size // (tc.batch_size * tc.world_size)
    if tc.num_training_steps < 1:
        raise TrainingError("--num_training_steps must be at least 1")
    for flag in ("eval_every", "log_every", "save_every", "check_ranks_every"):
        if getattr(tc, flag) < 0:
            raise TrainingError(f"--{flag} must be 0 (off) or a positive number of updates, got {getattr(tc, flag)}")
    if tc.matrix_lr_ratio != 1.0 and (tc.method != "full" or tc.matrix_lr_ratio <= 0):
        raise TrainingError(f"--matrix_lr_ratio {tc.matrix_lr_ratio:g}: a positive ratio, for --method full only")
    if tc.per_layer_updates:
        why = ("--grad_clipping 0 (the norm of all gradients never exists)" if tc.grad_clipping > 0 else
               "one micro-step per update (--total_batch_size = --batch_size)" if tc.grad_accum > 1 else
               "one process (no DDP)" if tc.world_size > 1 else
               "no --dtype float16 (the GradScaler unscales all gradients at once)" if tc.dtype == "float16" else None)
        if why:
            raise TrainingError(f"--per_layer_updates needs {why}")


def prepare_data(run):
    """Token shards -> fixed validation windows. LOCAL_RANK 0 of each node prepares them (prepare's file
    lock makes a shared filesystem safe); the other ranks poll for the finished folder outside any
    collective, so a preparation longer than --dist_timeout times nothing out."""
    tc = run.tc
    source = (tc.dataset, tc.dataset_config, tc.tokenizer, tc.data_dir, tc.dataset_tokens, tc.val_fraction)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        folder = data_lib.prepare(*source, log=run.log, num_proc=tc.num_proc, val_split=tc.val_split)
    else:
        folder = data_lib.wait_until_prepared(data_lib.shard_folder(*source, val_split=tc.val_split), log=run.log)
    run.data = data_lib.TokenData(folder, tc.max_length, tc.seed)
    return run.data.val_windows(tc.eval_tokens)


def build(run, vocab_size):
    """The model and optimizer on the device; the full-precision model never exists there at once.

    The GPT is built on the meta device (shapes only); the method's wrap() materializes and replaces
    its layers one at a time, then the rest (embeddings, norms, lm_head) is materialized: from the
    seed's init, or from --warmed_up_model, read tensor by tensor."""
    tc, mc = run.tc, run.mc
    gcfg = get_config(tc.model_config, vocab_size)
    if tc.max_length > gcfg.max_seq_len:
        raise TrainingError(f"--max_length {tc.max_length} exceeds the model's max_seq_len {gcfg.max_seq_len}")
    with torch.device("meta"):
        model = GPT(gcfg, seed=tc.seed)  # the same init on every rank
    warm = None
    if tc.warmed_up_model:
        if not os.path.isfile(tc.warmed_up_model):
            raise TrainingError(f"--warmed_up_model {tc.warmed_up_model} not found")
        obj = load_checkpoint(tc.warmed_up_model, "--warmed_up_model", " (expected a model.pt written by train.py)")
        warm = obj.get("model") if isinstance(obj, dict) else None
        expected = {k: v.shape for k, v in model.state_dict().items()}
        why = mismatch(expected, {k: v.shape for k, v in warm.items()}, "the file") if isinstance(warm, dict) else "no 'model' state dict"
        if why:
            raise TrainingError(f"--warmed_up_model {tc.warmed_up_model} does not fit --model_config {tc.model_config}: {why}")
        tc.data_step_offset = int(obj.get("steps", 0))  # continue the data stream after the warm-up's batches
        run.log(f"warm start from {tc.warmed_up_model} (its {tc.data_step_offset} updates of data are skipped)")
    model.plan(run.device, getattr(torch, tc.storage_dtype), warm)
    if run.hook("wrap"):
        run.method.wrap(model, mc, tc)  # METHOD: model surgery, one layer at a time
    model.materialize()  # whatever the method did not replace
    model.plan(None)  # done: drop the warm-start file
    model.activation_checkpointing = tc.activation_checkpointing  # GPT.forward checkpoints each block
    optimizer = run.method.make_optimizer(model, mc, tc) if run.hook("make_optimizer") else default_optimizer(model, tc)
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
    run.model, run.optimizer, run.forward = model, optimizer, model
    lr_multiplier(run, 0)  # validates --scheduler before any work
    if tc.per_layer_updates:
        install_per_layer_updates(run)
    return run


def lr_multiplier(run, step):  # METHOD: a method may replace the schedule (ReLoRA's jagged cosine)
    m = run.method.lr_multiplier(step, run.mc, run.tc) if run.hook("lr_multiplier") else None
    return lr_schedule(step, run.tc) if m is None else float(m)


def install_per_layer_updates(run):
    """--per_layer_updates: each parameter is stepped inside its post-accumulate-grad hook and its
    gradient freed at once, so gradients never exist for the whole model. optimizer.step() then
    touches just that parameter: every other gradient is None (not computed yet, or freed)."""
    if run.hook("before_step") and not run.hook("param_step"):
        raise TrainingError(f"{run.tc.method} changes all gradients before the optimizer step; it does not "
                            "support --per_layer_updates")

    def on_gradient(p):
        if run.hook("param_step"):
            run.method.param_step(run.step, p, run.model, run.optimizer, run.mc, run.tc)  # METHOD
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        p.grad = None  # also when p is not in the optimizer (a full weight the method used)

    for p in run.model.parameters():  # all of them: a method may switch requires_grad on for an event
        frozen = not p.requires_grad
        p.requires_grad_(True)  # a hook can only be registered on a tensor that requires grad; it stays
        p.register_post_accumulate_grad_hook(on_gradient)  # when requires_grad goes off and on again
        p.requires_grad_(not frozen)


def distribute(run):
    """What batches go through: the model, compiled (--compile) and wrapped in DDP under torchrun."""
    tc = run.tc
    run.forward = torch.compile(run.model) if tc.compile else run.model
    if tc.world_size > 1 and (run.method.use_ddp(run.mc, tc) if run.hook("use_ddp") else True):
        from torch.nn.parallel import DistributedDataParallel as DDP
        import inspect  # buffers are identical on every rank by construction: no per-forward broadcast
        no_sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        run.forward = DDP(run.forward, device_ids=[run.device.index] if run.device.type == "cuda" else None, **{no_sync_kw: False})


def resume(run, ckpt_path):
    """Load ckpt.pt into the built model and optimizer; -> the update to continue from."""
    tc, log = run.tc, run.log
    ck = load_checkpoint(ckpt_path)
    saved_tc, saved_mc = ck.get("train_config", {}), ck.get("method_config", {})
    for key in ("method", "model_config"):
        if saved_tc.get(key) != getattr(tc, key):
            raise TrainingError(f"checkpoint {ckpt_path} was made with --{key} {saved_tc.get(key)}, not {getattr(tc, key)}")
    changed = [f"--{k} {v} (now {getattr(run.mc, k)})" for k, v in saved_mc.items()
               if hasattr(run.mc, k) and getattr(run.mc, k) != v]
    why = mismatch({k: v.shape for k, v in run.model.state_dict().items()}, {k: v.shape for k, v in ck["model"].items()}, "the checkpoint")
    if why:
        raise TrainingError(f"checkpoint {ckpt_path} does not fit this model: {why}"
                            + (f"; it was made with {', '.join(changed)}" if changed else ""))
    try:
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise TrainingError(f"checkpoint {ckpt_path} does not match this method's optimizer: {str(e).splitlines()[0]}"
                            + (f"; it was made with {', '.join(changed)}" if changed else "")) from None
    if run.scaler is not None and "scaler" in ck:
        run.scaler.load_state_dict(ck["scaler"])
    if run.hook("set_state"):
        run.method.set_state(run.model, run.optimizer, run.mc, ck.get("method_state", {}))
    tc.data_step_offset = saved_tc.get("data_step_offset", 0)
    run.records = ck.get("records", [])
    log(f"resumed from {ckpt_path} at update {ck['step']}")
    return ck["step"]


def train_step(run, step, mark=lambda phase: None):
    """One update: step_start, forward and backward per micro-step, before_step, clipping, the LR, the
    optimizer step and after_step. -> (sum of the micro-step losses, grad norm or None, events).

    Returns tensors and never reads them, so it also runs on fake tensors; `mark(phase)` names each
    phase for bench.py --memory."""
    tc, model, optimizer, hook = run.tc, run.model, run.optimizer, run.hook
    run.step = step
    mult = lr_multiplier(run, step)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * mult
    loss_sum = torch.zeros((), device=run.device)
    mark("step_start")
    if hook("step_start"):
        run.method.step_start(step, model, run.mc, tc)
    for micro in range(tc.grad_accum):
        mark("forward")
        x, y = run.data.batch(step + tc.data_step_offset, tc.batch_size, tc.total_batch_size, micro, tc.rank, tc.world_size)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.forward is not model:  # DDP: sync gradients on the last micro-step only; set before the forward
            run.forward.require_backward_grad_sync = micro == tc.grad_accum - 1
        with run.autocast:
            _, loss = run.forward(x, y)
        loss_sum += loss.detach()
        loss = loss / tc.grad_accum  # the gradient of the mean over micro-batches
        mark("backward")  # --per_layer_updates: the optimizer steps happen in here
        (run.scaler.scale(loss) if run.scaler else loss).backward()
    events, grad_norm = {}, None
    if not tc.per_layer_updates:
        if run.scaler:
            run.scaler.unscale_(optimizer)
        mark("before_step")
        if hook("before_step"):
            events.update(run.method.before_step(step, model, optimizer, run.mc, tc) or {})  # METHOD
        mark("clip")
        if tc.grad_clipping > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clipping)
        mark("optimizer")
        if run.scaler:
            run.scaler.step(optimizer)
            run.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    mark("after_step")
    if hook("after_step"):
        events.update(run.method.after_step(step, model, optimizer, run.mc, tc) or {})  # METHOD: periodic event
    return loss_sum, grad_norm, events


def save_checkpoint(run, path, step_done):
    st = run.method.get_state(run.model, run.optimizer, run.mc) if run.hook("get_state") else {}
    if run.tc.rank == 0:
        atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step_done,
                     "method_state": st, "train_config": dataclasses.asdict(run.tc),
                     "method_config": dataclasses.asdict(run.mc), "records": run.records,
                     **({"scaler": run.scaler.state_dict()} if run.scaler else {})}, path)


def finish(run, step_done, start_step, timing, interrupted):
    """summary.json (also for an interrupted run), and for a finished one model.pt, loss.png and a sample."""
    tc, model, master = run.tc, run.model, run.tc.rank == 0
    val = [r for r in run.records if "val_loss" in r]
    train = [r for r in run.records if "loss" in r]
    tokens_per_step = tc.total_batch_size * tc.max_length
    summary = {
        "method": tc.method, "model_config": tc.model_config, "interrupted": interrupted,
        "val_loss": val[-1]["val_loss"] if val else None, "val_ppl": val[-1]["val_ppl"] if val else None,
        "train_loss": train[-1]["loss"] if train else None, "steps": step_done, "tokens": step_done * tokens_per_step,
        "wall_time_s": timing["wall"], "train_time_s": timing["train"],
        "tokens_per_sec": (step_done - start_step) * tokens_per_step / max(timing["train"], 1e-9),
        "total_params": count_params_formula(model.config),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "param_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": state_bytes(run.optimizer), "peak_memory_bytes": peak_memory(run.device),
        "peak_memory_kind": "cuda max_memory_allocated" if run.device.type == "cuda" else "process peak RSS",
        "device": str(run.device), "world_size": tc.world_size, "dtype": tc.dtype, "storage_dtype": tc.storage_dtype,
    }
    if tc.world_size > 1 and tc.check_ranks_every and not interrupted:  # a stop between LTE local merges may differ
        assert_ranks_agree(model, step_done - 1)
    plain = None if interrupted else (run.method.export(model, run.mc) if run.hook("export") else model.state_dict())
    if master:
        with open(os.path.join(tc.save_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    if master and not interrupted:  # `steps`: a warm start from this file continues the data stream after it
        save_plain(plain, model.config, os.path.join(tc.save_dir, "model.pt"), steps=step_done + tc.data_step_offset,
                   tokenizer=run.data.meta["tokenizer"])
        plot_losses(run.records, os.path.join(tc.save_dir, "loss.png"), f"{tc.method} on {tc.model_config}")
        run.log(f"done: {step_done} updates, {summary['tokens']:,} tokens in {summary['wall_time_s']:.0f}s "
                f"({summary['tokens_per_sec']:,.0f} tok/s) | val_loss {summary['val_loss']:.4f} | outputs in {tc.save_dir}")
        if tc.sample_tokens:  # from the training model in eval mode: the function model.pt holds, no second copy
            prompt = torch.tensor([[run.data.meta["eot_token"]]], device=run.device)
            model.eval()
            with run.autocast:
                out = model.generate(prompt, tc.sample_tokens, temperature=0.8, top_k=50,
                                     generator=torch.Generator(run.device).manual_seed(tc.seed))
            model.train()
            run.log("sample:\n" + data_lib.decode(run.data.meta["tokenizer"], out[0, 1:].tolist()))
    return summary


# ----------------------------------------------------------------------------- main


def main(argv=None):
    """Train; returns {"summary": ..., "metrics": [...]}. Raises TrainingError on bad input."""
    tc, method, mc = parse_args(argv)
    run = setup(tc, method, mc)
    check_geometry(tc)
    master = tc.rank == 0
    if master:  # fail on an unwritable --save_dir before any work
        try:
            os.makedirs(tc.save_dir, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--save_dir {tc.save_dir} cannot be created ({e.strerror})") from None
        if not os.access(tc.save_dir, os.W_OK):
            raise TrainingError(f"--save_dir {tc.save_dir} is not writable")
    with folder_lock(tc.save_dir) if master else contextlib.nullcontext():
        return fit(run, argv)


def fit(run, argv):
    """Stages 2-5 of main(), while this process holds the --save_dir lock."""
    tc, log, master = run.tc, run.log, run.tc.rank == 0
    ckpt_path = os.path.join(tc.save_dir, "ckpt.pt")
    val_windows = prepare_data(run)
    build(run, run.data.vocab_size)
    model = run.model
    n_total, n_train = count_params_formula(model.config), sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model {tc.model_config}: {n_total / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable "
        f"({100 * n_train / n_total:.1f}%) | method {tc.method} | {tc.world_size} rank(s) on {run.device.type} "
        f"| {tc.dtype} compute, {tc.storage_dtype} storage | grad_accum {tc.grad_accum} "
        f"| {tc.total_batch_size * tc.max_length:,} tokens/update")
    start_step = resume(run, ckpt_path) if tc.autoresume and os.path.isfile(ckpt_path) else 0
    if start_step > tc.num_training_steps:
        raise TrainingError(f"checkpoint {ckpt_path} is at update {start_step}, beyond --num_training_steps {tc.num_training_steps}")
    if start_step == tc.num_training_steps:
        log(f"{tc.save_dir} has finished its {start_step} updates; nothing to do "
            "(raise --num_training_steps to continue training)")
        summary_path = os.path.join(tc.save_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
        return {"summary": summary, "metrics": run.records}
    if master:
        with open(os.path.join(tc.save_dir, "config.json"), "w") as fh:
            json.dump({"train": dataclasses.asdict(tc), "method": dataclasses.asdict(run.mc), "git_commit": git_commit(),
                       "argv": sys.argv if argv is None else list(argv)}, fh, indent=1)
        with open(os.path.join(tc.save_dir, "metrics.jsonl"), "w") as fh:  # the log up to the checkpoint, no later
            fh.writelines(json.dumps(r) + "\n" for r in run.records)

    distribute(run)
    stop = {"signal": None}
    old_handlers = {}
    if threading_main():
        for s in SIGNAL_EXIT:
            old_handlers[s] = signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    from tqdm import tqdm
    bar = tqdm(total=tc.num_training_steps, initial=start_step, ncols=80, disable=not (master and sys.stderr.isatty()))
    say = bar.write if not bar.disable else log  # every line goes through the bar, never across it

    tracker = start_wandb(tc, run.mc, argv) if tc.wandb and master else None

    def record(rec):
        run.records.append(rec)
        if master:
            with open(os.path.join(tc.save_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if tracker:
            tracker.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    # --- the loop
    tokens_per_step = tc.total_batch_size * tc.max_length
    timing, t_start, interrupted, step_done = {"train": 0.0}, time.time(), False, start_step
    model.train()
    try:
        for step in range(start_step, tc.num_training_steps):
            t0 = time.perf_counter()
            torch.manual_seed(tc.seed * 1_000_003 + step * 4099 + tc.rank)  # dropout etc.: per step and rank
            loss_sum, grad_norm, events = train_step(run, step)
            if tc.world_size > 1:
                dist.all_reduce(loss_sum)  # SUM (gloo has no AVG)
                loss_sum /= tc.world_size
                flag = torch.tensor([float(stop["signal"] is not None)], device=run.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and stop["signal"] is None:
                    stop["signal"] = signal.SIGTERM  # another rank was signalled
            loss_val = loss_sum.item() / tc.grad_accum
            if not math.isfinite(loss_val):
                raise TrainingError(f"loss is {loss_val} at update {step + 1}; the last good checkpoint "
                                    f"({ckpt_path}) is untouched. Lower --lr or check the data")
            dt = time.perf_counter() - t0
            timing["train"] += dt
            step_done = step + 1
            last = step_done == tc.num_training_steps
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
            events = {k: float(v) for k, v in events.items()}
            logging_now = bool(tc.log_every) and step_done % tc.log_every == 0
            if logging_now or events or last:
                rec = {"step": step_done, "tokens": step_done * tokens_per_step, "loss": loss_val, "lr": tc.lr * lr_multiplier(run, step),
                       "dt_ms": 1000 * dt, "tokens_per_sec": tokens_per_step / dt,
                       **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                       **{f"method/{k}": v for k, v in events.items()}}
                record(rec)
                if logging_now or last:
                    say(f"step {step_done} | loss {loss_val:.4f} | lr {rec['lr']:.2e} | dt {1000 * dt:.0f}ms "
                        f"| tok/s {tokens_per_step / dt:,.0f}" + "".join(f" | {k} {v:.4g}" for k, v in events.items()))
            if tc.check_ranks_every and tc.world_size > 1 and step_done % tc.check_ranks_every == 0:
                assert_ranks_agree(model, step)
            if (tc.eval_every and step_done % tc.eval_every == 0) or last:
                vl = evaluate(model, val_windows, tc.batch_size, run.device, run.autocast, tc.rank, tc.world_size)
                record({"step": step_done, "tokens": step_done * tokens_per_step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50))})
                say(f"step {step_done} | val_loss {vl:.4f} | val_ppl {math.exp(min(vl, 50)):.2f}")
            stopping = stop["signal"] is not None or (tc.stop_at_step and step_done >= tc.stop_at_step and not last)
            if (tc.save_every and step_done % tc.save_every == 0) or last or stopping:
                save_checkpoint(run, ckpt_path, step_done)
            crash_for_test(tc.rank, step_done)  # LOWRANK_TEST_KILL (the elastic-restart test) only
            if stopping and not last:
                interrupted = True
                say(f"stopped at update {step_done}; checkpoint saved to {ckpt_path} (continue with --autoresume)")
                break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    timing["wall"] = time.time() - t_start
    summary = finish(run, step_done, start_step, timing, interrupted)
    if tracker:
        tracker.summary.update({k: v for k, v in summary.items() if v is not None})
        tracker.finish()
    if stop["signal"] is not None:
        summary["signal"] = int(stop["signal"])
    return {"summary": summary, "metrics": run.records}


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


def cli():
    finished = False
    try:
        out, finished = run_cli(main, USER_ERRORS), True
    finally:
        end_process_group(finished)
    sys.exit(SIGNAL_EXIT.get(out["summary"].get("signal"), 0))


if __name__ == "__main__":
    cli()
