"""
What a training run reads and writes besides the model: train.py's bookkeeping, kept apart so
that train.py reads as the training loop.

- folder_lock: one run per --save_dir (a second one is refused, a dead one's lock taken over)
- atomic_save / load_checkpoint: checkpoints written by rename, read memory-mapped with
  weights_only=True (a checkpoint never runs code), with one-line errors
- mismatch: which tensors and shapes differ between a checkpoint and the model
- git_commit, plot_losses, start_wandb: the run's provenance, loss.png and optional W&B
- run_cli: the one-line `error: ...` (exit 2) of train.py, sample.py and export.py
- machine: one line naming the device, for the reports of bench.py and sweep.py
- start_process_group / end_process_group: DDP's process group on keys of this torchrun attempt's
  own, and its ordered teardown; crash_for_test: the SIGKILL of the elastic-restart test
"""

import contextlib
import dataclasses
import datetime
import glob
import os
import signal
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainingError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint. Another
    writer's temporary file is a killed one's (one run holds a --save_dir): removed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
    for old in glob.glob(glob.escape(path) + ".*.tmp"):
        with contextlib.suppress(OSError):
            os.remove(old)


def load_checkpoint(path, what="checkpoint", advice="; move it away to start fresh"):
    """A checkpoint memory-mapped on the CPU: tensors are read as they are copied into the model."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise TrainingError(f"{what} {path} is corrupt or unreadable ({type(e).__name__}){advice}") from None


def mismatch(expected, found, source):
    """One line naming the tensors that differ between a state dict and the model ({name: shape} each)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k} {tuple(found[k])} in {source} vs {tuple(expected[k])} here"
              for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = ([f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else "")] if missing else []) + \
            ([f"unexpected {', '.join(extra[:3])}" + (f" (+{len(extra) - 3})" if len(extra) > 3 else "")] if extra else []) + shapes[:2]
    return "; ".join(parts)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def plot_losses(records, path, title):
    from matplotlib.figure import Figure  # no pyplot: never switches the backend of a notebook that calls main()
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "val")):
        pts = [(r["tokens"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label, ms=3, lw=1)
    ax.set(xlabel="tokens", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists, owned by someone else
    return pid > 0


@contextlib.contextmanager
def folder_lock(folder):
    """Hold `folder/lock` (our pid) for the run, so two runs never write one --save_dir; a stale lock
    left by a process that no longer exists is taken over."""
    path, me = os.path.join(folder, "lock"), f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                host, pid = open(path).read().split()
            except (ValueError, OSError):
                host, pid = socket.gethostname(), "-1"  # unreadable or half-written: treat as stale
            if host != socket.gethostname() or process_alive(int(pid)):
                raise TrainingError(f"--save_dir {folder} is in use by process {pid} on {host}; "
                                    "wait for it or choose another --save_dir") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
    else:
        raise TrainingError(f"cannot take the lock {path}")
    with os.fdopen(fd, "w") as fh:
        fh.write(me)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def start_wandb(tc, mc, argv):
    """--wandb: a W&B run that train.py feeds the same records as metrics.jsonl (imported only here)."""
    try:
        import wandb
    except ImportError:
        raise TrainingError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=tc.wandb_project, name=tc.wandb_run_name or os.path.basename(os.path.abspath(tc.save_dir)),
                      dir=tc.save_dir, config={"train": dataclasses.asdict(tc), "method": dataclasses.asdict(mc),
                                               "argv": sys.argv if argv is None else list(argv)})


def run_cli(main, errors, argv=None):
    """main(argv), with an expected error (`errors`) printed as one line `error: ...` and exit code 2,
    no traceback. `LOWRANK_DEBUG=1` re-raises it for the traceback."""
    try:
        return main(argv) if argv is not None else main()
    except errors as e:
        if os.environ.get("LOWRANK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def start_process_group(backend, timeout_s):
    """init_process_group under torchrun (env://), with a `timeout_s` for every collective, on store
    keys of this restart attempt's own.

    torchrun's agent hosts one TCPStore for the whole job and the workers of every attempt
    (--max-restarts) share it, under the same keys: the addresses the dead attempt's ranks
    published are still there, and a restarted rank that reads one before its peer has overwritten
    it connects to a dead port (gloo: "connectFullMesh failed ... Connection refused", or a hang in
    init_process_group). TORCHELASTIC_RESTART_COUNT (0 outside torchrun) names the attempt.

    torch.distributed.nn is imported first: its functions take `group=group.WORLD` as a default,
    evaluated at import, and DDP's constructor imports it (through torch._dynamo); imported after
    the group exists, those ten defaults hold the group for good, so destroy_process_group cannot
    free it and gloo's threads live on into the interpreter's shutdown."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (before the group exists: see above)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"default_pg/attempt_{attempt}", store),
                            rank=rank, world_size=world_size, timeout=timeout)


def crash_for_test(rank, step):
    """Tests only: LOWRANK_TEST_KILL=RANK:UPDATE makes that rank SIGKILL itself after that update, on
    torchrun's first attempt only, so that an elastic restart (--max-restarts) has to resume the run."""
    spec = os.environ.get("LOWRANK_TEST_KILL")
    if spec == f"{rank}:{step}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def end_process_group(finished):
    """DDP's teardown in order. A run every rank `finished`: the ranks meet at a barrier first, so
    that none leaves while another still uses the group; then the group is destroyed, which joins
    gloo's threads (start_process_group keeps it destroyable) before the interpreter shuts down.
    After an error a peer may be dead: destroy only."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def machine():
    """The GPU's name, or the CPU, its cores and the torch version."""
    import platform
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"

