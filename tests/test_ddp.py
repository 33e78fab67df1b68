"""DDP that waits and restarts: slow data preparation, torchrun's elastic restarts, the store they share.

Two gloo ranks on the CPU, either spawned here (each sets the torchrun environment and calls
train.main) or under `torchrun --standalone` as a subprocess.
"""

import datetime
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, TINY

SPAWN = multiprocessing.get_context("spawn")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, args, world=2, timeout=120):
    """target(rank, *args) in `world` spawned processes; -> their exit codes (None: still running at the
    timeout, then killed)."""
    procs = [SPAWN.Process(target=target, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


# ----------------------------------------------------------------------------- data preparation


def slow_data_rank(rank, port, delay, argv):
    """One torchrun-like rank whose data preparation (LOCAL_RANK 0's data.prepare) first sleeps `delay` s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    import data
    import runfiles
    real = data.prepare

    def slow(*a, **k):
        time.sleep(delay)  # a corpus that takes longer to tokenize than --dist_timeout
        return real(*a, **k)

    data.prepare = slow
    finished = False
    try:
        train.main(argv)
        finished = True
    finally:
        runfiles.end_process_group(finished)
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")] \
        if os.path.isdir("/proc/self/task") else []
    with open(os.path.join(argv[argv.index("--save_dir") + 1], f"threads_rank{rank}"), "w") as fh:
        fh.write(" ".join(threads))


@pytest.mark.slow  # 2 x 10 s of preparation
def test_ranks_wait_for_a_preparation_longer_than_dist_timeout(tmp_path):
    """LOCAL_RANK 0 prepares for 2 x --dist_timeout while rank 1 polls for the folder outside any collective
    (with a barrier, rank 1's collective timed out); both then train. The teardown leaves no gloo thread
    running into the interpreter's shutdown (before the fix, DDP's import of torch.distributed.nn pinned
    the group and its threads: destroy_process_group could not free it)."""
    timeout = 10  # seconds: room for a loaded CI machine between the preparation and the first collective
    argv = TINY + ["--dist_timeout", str(timeout), "--tokenizer", "bytes", "--num_proc", "1",
                   "--data_dir", str(tmp_path / "fresh_cache"), "--save_dir", str(tmp_path / "run")]
    codes = run_ranks(slow_data_rank, (free_port(), 2 * timeout, argv))
    assert codes == [0, 0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["val_loss"] is not None
    for rank in range(2):
        threads = (tmp_path / "run" / f"threads_rank{rank}").read_text().split()
        assert not [t for t in threads if "gloo" in t], threads


def test_a_checkpoint_write_removes_what_a_killed_writer_left(tmp_path):
    import runfiles
    (tmp_path / "ckpt.pt.12345.tmp").write_bytes(b"half a checkpoint")  # its rank 0 was SIGKILLed mid-save
    runfiles.atomic_save({"step": 1}, str(tmp_path / "ckpt.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_dist_timeout_must_be_positive(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(train.TrainingError, match="--dist_timeout must be at least 1 second"):
        train.main(TINY + ["--dist_timeout", "0", "--save_dir", str(tmp_path / "x")])


# ----------------------------------------------------------------------------- the store of a restart


def restarted_rank(rank, attempt, port, late, other_started, out):
    """A worker of torchrun attempt `attempt` on the agent's long-lived store at `port`: joins the group
    the way train.py does and all-reduces once. Rank `late` starts 1.5 s after the other one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(attempt))
    import torch.distributed as dist
    import runfiles
    if rank != late:
        other_started.set()
    else:
        other_started.wait(60)
        time.sleep(1.5)  # the other rank has looked up this rank's address by now
    runfiles.start_process_group("gloo", 20)
    t = torch.ones(1)
    dist.all_reduce(t)
    if attempt == 0:  # DDP's constructor imports torch.distributed.nn, which used to pin the group
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))(torch.ones(1, 2)).sum().backward()
    dist.destroy_process_group()
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")] \
        if os.path.isdir("/proc/self/task") else []
    with open(os.path.join(out, f"attempt{attempt}_rank{rank}"), "w") as fh:
        fh.write(f"{t.item()} " + " ".join(threads))


def test_a_restarted_group_never_reads_the_dead_attempts_addresses(tmp_path):
    """torchrun's agent keeps one TCPStore for every attempt. A restarted rank that comes up before its
    peer must not connect to the address the peer's dead predecessor published there (before the fix:
    gloo's connectFullMesh 'Connection refused', or a hang in init_process_group; which of the two, or
    luck, depends on the order of the ports: two restarts made it fail 5 times in 5). And the group
    DDP used is really destroyed: destroy_process_group joins gloo's threads."""
    import torch.distributed as dist
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=datetime.timedelta(seconds=60))
    for attempt in range(3):
        late = attempt % 2  # 0 first: the attempt every later one restarts
        codes = run_ranks(restarted_rank, (attempt, agent.port, late, SPAWN.Event(), str(tmp_path)), timeout=60)
        assert codes == [0, 0], f"attempt {attempt}: exit codes {codes} (None: hung)"
        for r in range(2):
            result, *threads = (tmp_path / f"attempt{attempt}_rank{r}").read_text().split()
            assert result == "2.0" and not [t for t in threads if "gloo" in t], threads  # destroyed: no gloo thread left


# ----------------------------------------------------------------------------- elastic restarts


def weights(save_dir):
    return torch.load(os.path.join(save_dir, "model.pt"), weights_only=True)["model"]


@pytest.mark.parametrize("victim", [0, pytest.param(1, marks=pytest.mark.slow)])  # ~17 s each on 2 idle cores
def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_resumes_to_the_unbroken_result(train_run, data_dir, tmp_path, victim):
    """torchrun --max-restarts 1: rank `victim` SIGKILLs itself after update 3 (checkpoint at 2); torchrun
    restarts both ranks, they resume from update 2 and end where an unbroken run ends."""
    save = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           os.path.join(ROOT, "train.py"), *TINY, "--num_training_steps", "6", "--save_every", "2", "--autoresume",
           "--total_batch_size", "8", "--data_dir", data_dir, "--save_dir", str(save)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOWRANK_TEST_KILL=f"{victim}:3")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr and f"resumed from {save / 'ckpt.pt'} at update 2" in proc.stdout
    train_run("--num_training_steps", "6", "--total_batch_size", "8", save_dir=tmp_path / "unbroken")  # = 2 ranks
    a, b = weights(save), weights(tmp_path / "unbroken")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    val = [json.loads((d / "summary.json").read_text())["val_loss"] for d in (save, tmp_path / "unbroken")]
    assert abs(val[0] - val[1]) < 1e-6
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the lost update 3 is not logged twice
