"""Shared test helpers: tiny in-process training runs and 2-process torchrun (gloo) runs.

    def test_something(train_run, tmp_path):
        out = train_run("--method", "relora", "--relora", "2", save_dir=tmp_path / "a")
        out["summary"]["val_loss"], out["metrics"]

    def test_ddp(torchrun, tmp_path):
        proc = torchrun("--method", "relora", "--check_ranks_every", "1", save_dir=tmp_path / "d")
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a few updates of `tiny` on short windows: a run takes a second or two on a CPU
TINY = ["--num_training_steps", "4", "--batch_size", "4", "--max_length", "32", "--eval_every", "2",
        "--eval_tokens", "1024", "--log_every", "1", "--sample_tokens", "0", "--warmup_steps", "1",
        "--save_every", "0"]


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and kinder to a shared CPU.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Token shards of the built-in corpus, prepared once per test session."""
    import data
    d = str(tmp_path_factory.mktemp("data_cache"))
    data.prepare("builtin", tokenizer="bytes", data_dir=d, log=lambda *a: None)
    return d


@pytest.fixture
def train_run(data_dir, tmp_path):
    """train.main in-process with the TINY settings; later arguments override earlier ones."""
    import train

    def run(*args, save_dir=None):
        save_dir = str(save_dir or tmp_path / "run")
        return train.main(TINY + ["--data_dir", data_dir, "--save_dir", save_dir] + [str(a) for a in args])
    return run


@pytest.fixture
def torchrun(data_dir, tmp_path):
    """`torchrun --standalone --nproc-per-node N train.py ...` as a subprocess; returns CompletedProcess.

    Fails the test with the output when the exit code is not 0 (unless check=False)."""

    def run(*args, save_dir=None, nproc=2, check=True, timeout=240):
        save_dir = str(save_dir or tmp_path / "ddp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(ROOT, "train.py")] + TINY + ["--data_dir", data_dir, "--save_dir", save_dir] + [str(a) for a in args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        if check and proc.returncode != 0:
            pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc
    return run


def run_cli(*args, timeout=120):
    """`python train.py ...` as a subprocess (for exit codes and error messages)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
