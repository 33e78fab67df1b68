"""
The training driver: one LLaMA model, one data pipeline, any method.

    python train.py                                   # full-rank `tiny` on the built-in corpus (~1-2 min, CPU)
    python train.py --method relora --help            # a method's own flags are listed under its name
    torchrun --nproc-per-node 2 train.py              # DDP: NCCL on GPUs, gloo on CPU
    python train.py --model_config llama_60m --dataset allenai/c4 --dataset_config en \
        --max_length 256 --batch_size 64 --total_batch_size 512 --dtype bfloat16 --compile

Outputs in --save_dir (default out/<method>): config.json, metrics.jsonl, summary.json,
ckpt.pt (resume with --autoresume), model.pt (a plain model.py state dict) and loss.png.

The method seam
---------------
`--method NAME` imports NAME.py. train.py never branches on the name: it looks up these entry
points in the module and falls back to the defaults when one is missing.

  Config                                   dataclass (required). Its fields become flags; a field's
                                           metadata may hold "help" and "aliases" (["--lora_r"]).
  TRAIN_DEFAULTS                           dict: the method's own defaults for train.py flags
                                           ({"lr": 1e-2}); the command line still wins.
  wrap(model, cfg, train)                  in-place surgery on the raw GPT, already on its device,
                                           before compile and DDP; freezes what the method freezes.
  make_optimizer(model, cfg, train)        -> optimizer. Default: AdamW over trainable parameters.
  lr_multiplier(step, cfg, train)          -> float, or None for train.py's --scheduler.
  step_start(step, model, cfg, train)      before the first forward of update `step` (e.g. "produce
                                           dL/dW on this step": GoLore, LoQT).
  before_step(step, model, opt, cfg, train) -> dict. After backward (gradients reduced across ranks
                                           and unscaled), before clipping and opt.step() (SwitchLoRA).
  after_step(step, model, opt, cfg, train)  -> dict. After opt.step() (merges, resets, refreshes).
  get_state(model, opt, cfg) -> dict       extra checkpointed state (tensors and plain numbers);
  set_state(model, opt, cfg, state)        restores it. Model buffers and optimizer state are
                                           checkpointed anyway; most methods need neither hook.
  export(model, cfg) -> state dict         a plain GPT state dict (adapters merged, weights
                                           dequantized). Default: model.state_dict().
  use_ddp(cfg, train) -> bool              False: no DDP wrapper; the method communicates itself.

`step` is the 0-based index of the update being made. `train` is the TrainConfig below, with
rank, world_size, grad_accum and device filled in. Hooks run on every rank with the unwrapped
model; dicts they return are logged as `method/<key>`. The global RNG is reseeded at every update
from (seed, step, rank), so dropout differs across ranks and resume is exact without saving RNG
state; randomness that must agree across ranks (re-inits, random projections) should come from a
torch.Generator seeded with (seed, step). Gradient sync under DDP happens only on the last
micro-step (require_backward_grad_sync is set before that forward).
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
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import data as data_lib  # noqa: E402
from model import GPT, count_params_formula, get_config, save_plain  # noqa: E402


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    method: str = opt("full", "method file to load: full, relora, switchlora, golore, lte, loqt")
    # model and data
    model_config: str = opt("tiny", "preset name (tiny, llama_9m ... llama_7b) or a JSON config file")
    dataset: str = opt("builtin", "builtin | a local .txt/.jsonl/.parquet file or folder | a hub dataset owner/name")
    dataset_config: str = opt(None, "hub dataset config, e.g. en for allenai/c4")
    tokenizer: str = opt("auto", "auto (gpt2 for hub data, bytes otherwise) | bytes | gpt2 | any tiktoken name")
    data_dir: str = opt("data_cache", "where token shards are written and reused")
    dataset_tokens: int = opt(50_000_000, "token budget read from the source")
    val_fraction: float = opt(0.05, "fraction of the token stream held out for validation")
    max_length: int = opt(128, "tokens per training window")
    # batch and optimisation
    batch_size: int = opt(16, "sequences per micro-batch per device")
    total_batch_size: int = opt(0, "sequences per update over all micro-steps and ranks (0: batch_size x ranks)")
    lr: float = opt(3e-3, "peak learning rate")
    warmup_steps: int = opt(50, "linear warmup steps", aliases=["--warmup"])
    num_training_steps: int = opt(500, "number of optimizer updates")
    scheduler: str = opt("cosine", "cosine | linear | constant (methods may add their own)")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of --lr")
    weight_decay: float = opt(0.0, "AdamW weight decay on 2-D tensors")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon (GaLore-lineage repos use 1e-6)", aliases=["--adamw_eps"])
    grad_clipping: float = opt(1.0, "clip the global gradient norm (0: off)")
    # system
    dtype: str = opt("auto", "auto (bfloat16 on a bf16 GPU, else float32) | float32 | bfloat16 | float16")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(0, "seeds the model init, the data order and every method event")
    # evaluation, logging, checkpoints
    eval_every: int = opt(100, "validate every N updates (and at the end)")
    eval_tokens: int = opt(65536, "validation tokens (fixed windows: every method sees the same ones)")
    log_every: int = opt(10, "print and record train metrics every N updates")
    save_every: int = opt(250, "checkpoint every N updates (and at the end); 0: only at the end")
    save_dir: str = opt(None, "output folder (default out/<method>)")
    autoresume: bool = opt(False, "continue from save_dir/ckpt.pt if it exists")
    warmed_up_model: str = opt(None, "start from a plain model.pt (e.g. a full-rank warm-up for ReLoRA)")
    stop_at_step: int = opt(0, "stop as if interrupted after N updates, with a checkpoint (0: off)")
    sample_tokens: int = opt(200, "length of the text sample printed at the end (0: none)")
    check_ranks_every: int = opt(0, "under DDP, assert every N updates that all ranks hold identical weights")
    # filled in at run time, not flags
    rank: int = field(default=0, metadata={"cli": False})
    world_size: int = field(default=1, metadata={"cli": False})
    grad_accum: int = field(default=1, metadata={"cli": False})


class TrainingError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


USER_ERRORS = (TrainingError, ValueError, FileNotFoundError)
CORE_FILES = {"model", "data", "train", "bench", "setup", "conftest"}

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
        help_ = f.metadata.get("help", "") + f" (default: {default})"
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
    """LR multiplier: linear warmup t/w, then cosine (or linear) decay to min_lr_ratio (METHODS.md §1)."""
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
    """AdamW over trainable parameters; weight decay on matrices only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                            "move it away to start fresh") from None


def assert_ranks_agree(model, step):
    """Every rank holds bit-identical parameters and buffers (float64 fingerprint per tensor)."""
    fp = torch.stack([t.detach().double().pow(2).sum() + t.detach().double().sum()
                      for t in model.state_dict().values() if t.is_floating_point()]).cpu()
    gathered = [torch.zeros_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fp)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise TrainingError(f"ranks disagree on the model weights after update {step + 1}")


def state_bytes(optimizer):
    n = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                n += v.numel() * v.element_size()
    return n


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB -> bytes


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def plot_losses(records, path):
    from matplotlib.figure import Figure  # no pyplot: never switches the backend of a notebook that calls main()
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "val")):
        pts = [(r["tokens"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label, ms=3, lw=1)
    ax.set(xlabel="tokens", ylabel="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    """Train; returns {"summary": ..., "metrics": [...]}. Raises TrainingError on bad input."""
    tc, method, mc = parse_args(argv)
    hook = lambda name: getattr(method, name, None)  # noqa: E731

    # --- distributed and device
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        tc.rank, tc.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tc.device == "auto":
        tc.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp and tc.device.startswith("cuda"):
        tc.device = f"cuda:{local_rank}"
        torch.cuda.set_device(tc.device)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if tc.device.startswith("cuda") else "gloo")
        if tc.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // tc.world_size))
    device, master = torch.device(tc.device), tc.rank == 0
    if tc.dtype == "auto":
        tc.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(tc.dtype, "?")
    if amp_dtype == "?":
        raise TrainingError(f"unknown --dtype '{tc.dtype}'")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    log = print if master else (lambda *a, **k: None)

    # --- batch geometry
    if tc.total_batch_size == 0:
        tc.total_batch_size = tc.batch_size * tc.world_size
    if tc.batch_size < 1 or tc.total_batch_size % (tc.batch_size * tc.world_size):
        raise TrainingError(f"--total_batch_size {tc.total_batch_size} must be a multiple of --batch_size "
                            f"{tc.batch_size} x {tc.world_size} rank(s)")
    tc.grad_accum = tc.total_batch_size // (tc.batch_size * tc.world_size)
    if tc.num_training_steps < 1:
        raise TrainingError("--num_training_steps must be at least 1")

    # --- data (rank 0 prepares the shards, the others wait and read them)
    prep = lambda: data_lib.prepare(tc.dataset, tc.dataset_config, tc.tokenizer, tc.data_dir,  # noqa: E731
                                    tc.dataset_tokens, tc.val_fraction, log=log)
    folder = prep() if master else None
    if ddp:
        dist.barrier()
        folder = folder or prep()
    data = data_lib.TokenData(folder, tc.max_length, tc.seed)
    val_windows = data.val_windows(tc.eval_tokens)

    # --- model, method surgery, optimizer
    gcfg = get_config(tc.model_config, data.vocab_size)
    if tc.max_length > gcfg.max_seq_len:
        raise TrainingError(f"--max_length {tc.max_length} exceeds the model's max_seq_len {gcfg.max_seq_len}")
    torch.manual_seed(tc.seed)  # identical init on every rank
    raw = GPT(gcfg)
    if tc.warmed_up_model:
        if not os.path.isfile(tc.warmed_up_model):
            raise TrainingError(f"--warmed_up_model {tc.warmed_up_model} not found")
        obj = load_checkpoint(tc.warmed_up_model, "cpu")
        try:
            raw.load_state_dict(obj["model"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise TrainingError(f"--warmed_up_model {tc.warmed_up_model} does not fit --model_config "
                                f"{tc.model_config}: {str(e).splitlines()[0]}") from None
        log(f"warm start from {tc.warmed_up_model}")
    raw.to(device)
    if hook("wrap"):
        method.wrap(raw, mc, tc)  # METHOD: model surgery
    optimizer = method.make_optimizer(raw, mc, tc) if hook("make_optimizer") else default_optimizer(raw, tc)
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])

    def lr_mult(step):  # METHOD: a method may replace the schedule (ReLoRA's jagged cosine)
        m = method.lr_multiplier(step, mc, tc) if hook("lr_multiplier") else None
        return lr_schedule(step, tc) if m is None else float(m)
    lr_mult(0)  # validates --scheduler before any work

    n_total = count_params_formula(gcfg)
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    log(f"model {tc.model_config}: {n_total / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable "
        f"({100 * n_train / n_total:.1f}%) | method {tc.method} | {tc.world_size} rank(s) on {device.type} "
        f"| {tc.dtype} | grad_accum {tc.grad_accum} | {tc.total_batch_size * tc.max_length:,} tokens/update")

    # --- resume
    os.makedirs(tc.save_dir, exist_ok=True) if master else None
    ckpt_path, start_step, records = os.path.join(tc.save_dir, "ckpt.pt"), 0, []
    if tc.autoresume and os.path.isfile(ckpt_path):
        ck = load_checkpoint(ckpt_path, device)
        for key in ("method", "model_config"):
            if ck.get("train_config", {}).get(key) != getattr(tc, key):
                raise TrainingError(f"checkpoint {ckpt_path} was made with --{key} {ck.get('train_config', {}).get(key)}, "
                                    f"not {getattr(tc, key)}")
        try:
            raw.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainingError(f"checkpoint {ckpt_path} does not match this model/method: {str(e).splitlines()[0]}") from None
        if hook("set_state"):
            method.set_state(raw, optimizer, mc, ck.get("method_state", {}))
        start_step, records = ck["step"], ck.get("records", [])
        log(f"resumed from {ckpt_path} at update {start_step}")

    def save(step_done):
        st = method.get_state(raw, optimizer, mc) if hook("get_state") else {}
        if master:
            atomic_save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": step_done,
                         "method_state": st, "train_config": dataclasses.asdict(tc),
                         "method_config": dataclasses.asdict(mc), "records": records}, ckpt_path)

    if master:
        with open(os.path.join(tc.save_dir, "config.json"), "w") as fh:
            json.dump({"train": dataclasses.asdict(tc), "method": dataclasses.asdict(mc), "git_commit": git_commit(),
                       "argv": sys.argv if argv is None else list(argv)}, fh, indent=1)
        with open(os.path.join(tc.save_dir, "metrics.jsonl"), "w") as fh:  # the log up to the checkpoint, no later
            fh.writelines(json.dumps(r) + "\n" for r in records)

    model = torch.compile(raw) if tc.compile else raw
    wrapped = ddp and (method.use_ddp(mc, tc) if hook("use_ddp") else True)
    if wrapped:
        from torch.nn.parallel import DistributedDataParallel as DDP
        import inspect  # buffers are identical on every rank by construction: no per-forward broadcast
        no_sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync_kw: False})

    stop = {"flag": False}
    def on_signal(signum, frame):  # noqa: E306
        stop["flag"] = True
    old_handlers = {}
    if hasattr(signal, "SIGTERM") and threading_main():
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, on_signal)

    def record(rec):
        records.append(rec)
        if master:
            with open(os.path.join(tc.save_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    tokens_per_step = tc.total_batch_size * tc.max_length
    try:
        from tqdm import tqdm
        bar = tqdm(total=tc.num_training_steps, initial=start_step, ncols=80, disable=not (master and sys.stderr.isatty()))
    except ImportError:
        bar = None
    train_time, t_train_start, interrupted, step, loss_val = 0.0, time.time(), False, start_step - 1, float("nan")
    raw.train()
    try:
        for step in range(start_step, tc.num_training_steps):
            t0 = time.perf_counter()
            torch.manual_seed(tc.seed * 1_000_003 + step * 4099 + tc.rank)  # dropout etc.: per step and rank
            if hook("step_start"):
                method.step_start(step, raw, mc, tc)
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                x, y = data.batch(step, tc.batch_size, tc.total_batch_size, micro, tc.rank, tc.world_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if wrapped:  # sync gradients on the last micro-step only; must be set before the forward
                    model.require_backward_grad_sync = micro == tc.grad_accum - 1
                with autocast:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                loss = loss / tc.grad_accum  # the gradient of the mean over micro-batches
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            events = {}
            if hook("before_step"):
                events.update(method.before_step(step, raw, optimizer, mc, tc) or {})  # METHOD: before the update
            grad_norm = (torch.nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], tc.grad_clipping)
                         if tc.grad_clipping > 0 else None)
            mult = lr_mult(step)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * mult
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hook("after_step"):
                events.update(method.after_step(step, raw, optimizer, mc, tc) or {})  # METHOD: periodic event
            if ddp:
                dist.all_reduce(loss_sum)  # SUM (gloo has no AVG)
                loss_sum /= tc.world_size
                flag = torch.tensor([float(stop["flag"])], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop["flag"] = bool(flag.item())
            loss_val = loss_sum.item() / tc.grad_accum
            if not math.isfinite(loss_val):
                raise TrainingError(f"loss is {loss_val} at update {step + 1}; the last good checkpoint "
                                    f"({ckpt_path}) is untouched. Lower --lr or check the data")
            dt = time.perf_counter() - t0
            train_time += dt
            done, last = step + 1, step + 1 == tc.num_training_steps
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}")
            if done % tc.log_every == 0 or events or last:
                rec = {"step": done, "tokens": done * tokens_per_step, "loss": loss_val, "lr": tc.lr * mult,
                       "dt_ms": 1000 * dt, "tokens_per_sec": tokens_per_step / dt}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                rec.update({f"method/{k}": v for k, v in events.items()})
                record(rec)
                if done % tc.log_every == 0 or last:
                    msg = (f"step {done} | loss {loss_val:.4f} | lr {tc.lr * mult:.2e} | dt {1000 * dt:.0f}ms "
                           f"| tok/s {tokens_per_step / dt:,.0f}")
                    (bar.write if bar and not bar.disable else log)(msg + "".join(f" | {k} {v:.4g}" for k, v in events.items()))
            if tc.check_ranks_every and ddp and done % tc.check_ranks_every == 0:
                assert_ranks_agree(raw, step)
            if done % tc.eval_every == 0 or last:
                vl = evaluate(raw, val_windows, tc.batch_size, device, autocast, tc.rank, tc.world_size)
                record({"step": done, "tokens": done * tokens_per_step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50))})
                log(f"step {done} | val_loss {vl:.4f} | val_ppl {math.exp(min(vl, 50)):.2f}")
            if tc.stop_at_step and done >= tc.stop_at_step and not last:
                stop["flag"] = True
            if (tc.save_every and done % tc.save_every == 0) or last or stop["flag"]:
                save(done)
            if stop["flag"] and not last:
                interrupted = True
                log(f"stopped at update {done}; checkpoint saved to {ckpt_path} (continue with --autoresume)")
                break
    finally:
        if bar:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # --- the end: summary, plain model, plot, sample
    val = [r for r in records if "val_loss" in r]
    done = step + 1
    summary = {
        "method": tc.method, "model_config": tc.model_config, "interrupted": interrupted,
        "val_loss": val[-1]["val_loss"] if val else None, "val_ppl": val[-1]["val_ppl"] if val else None,
        "train_loss": loss_val, "steps": done, "tokens": done * tokens_per_step,
        "wall_time_s": time.time() - t_train_start, "train_time_s": train_time,
        "tokens_per_sec": (done - start_step) * tokens_per_step / max(train_time, 1e-9),
        "total_params": n_total, "trainable_params": n_train,
        "param_bytes": sum(t.numel() * t.element_size() for t in raw.state_dict().values()),
        "grad_bytes": sum(p.numel() * p.element_size() for p in raw.parameters() if p.requires_grad),
        "optimizer_state_bytes": state_bytes(optimizer), "peak_memory_bytes": peak_memory(device),
        "device": str(device), "world_size": tc.world_size, "dtype": tc.dtype,
    }
    if ddp and tc.check_ranks_every and not interrupted:  # a stop between LTE local merges may differ
        assert_ranks_agree(raw, step)
    plain = method.export(raw, mc) if hook("export") else raw.state_dict()
    if master and not interrupted:
        save_plain(plain, gcfg, os.path.join(tc.save_dir, "model.pt"))
        plot_losses(records, os.path.join(tc.save_dir, "loss.png"))
        with open(os.path.join(tc.save_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        log(f"done: {done} updates, {summary['tokens']:,} tokens in {summary['wall_time_s']:.0f}s "
            f"({summary['tokens_per_sec']:,.0f} tok/s) | val_loss {summary['val_loss']:.4f} | outputs in {tc.save_dir}")
        if tc.sample_tokens:
            sample = GPT(gcfg)
            sample.load_state_dict(plain)
            sample.to(device).eval()
            prompt = torch.tensor([[data.meta["eot_token"]]], device=device)
            out = sample.generate(prompt, tc.sample_tokens, temperature=0.8, top_k=50,
                                  generator=torch.Generator(device).manual_seed(tc.seed))
            log("sample:\n" + data_lib.decode(data.meta["tokenizer"], out[0, 1:].tolist()))
    return {"summary": summary, "metrics": records}


def threading_main():
    import threading
    return threading.current_thread() is threading.main_thread()


def cli():
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("LOWRANK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
