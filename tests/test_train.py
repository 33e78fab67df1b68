import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, TINY, run_cli
from model import GPT, load_plain


def weights(save_dir):
    return torch.load(os.path.join(save_dir, "model.pt"), weights_only=True)["model"]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_default_command_smoke(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("--num_training_steps", "3", "--eval_every", "3", "--eval_tokens", "2048", "--sample_tokens", "20",
                   "--data_dir", data_dir, "--save_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "val_loss" in proc.stdout and "sample:" in proc.stdout
    for f in ("config.json", "metrics.jsonl", "summary.json", "ckpt.pt", "model.pt", "loss.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "train_loss", "steps", "tokens", "wall_time_s", "tokens_per_sec", "total_params",
                "trainable_params", "param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_memory_bytes"):
        assert key in summary, key
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 16 * 128
    assert summary["param_bytes"] == 4 * summary["total_params"]  # float32, nothing else stored
    # Adam's two moments, plus one scalar step tensor per parameter
    assert 0 <= summary["optimizer_state_bytes"] - 2 * summary["param_bytes"] <= 8 * 64
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["lr"] == 2e-3 and "git_commit" in config
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and all("step" in r and "tokens" in r for r in records)


def test_loss_falls(train_run):
    out = train_run("--num_training_steps", "25", "--eval_every", "25", "--lr", "3e-3", "--warmup_steps", "2")
    losses = [r["loss"] for r in out["metrics"] if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert out["summary"]["val_loss"] < 4.0  # from ln(257) = 5.55


def test_gradient_accumulation_equals_one_big_batch(train_run, tmp_path):
    train_run("--batch_size", "8", "--total_batch_size", "8", save_dir=tmp_path / "big")
    train_run("--batch_size", "2", "--total_batch_size", "8", save_dir=tmp_path / "ga4")
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "ga4")) < 1e-6


def test_resume_equals_unbroken_run(train_run, tmp_path):
    train_run("--num_training_steps", "6", save_dir=tmp_path / "a")
    first = train_run("--num_training_steps", "6", "--stop_at_step", "3", save_dir=tmp_path / "b")
    assert first["summary"]["interrupted"] and first["summary"]["steps"] == 3
    assert not (tmp_path / "b" / "model.pt").exists()
    second = train_run("--num_training_steps", "6", "--autoresume", save_dir=tmp_path / "b")
    assert second["summary"]["steps"] == 6
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) < 1e-6
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6


def test_model_pt_loads_into_model_py_alone(train_run, tmp_path):
    train_run(save_dir=tmp_path / "r")
    plain = load_plain(tmp_path / "r" / "model.pt").eval()
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    ref = GPT(plain.config).eval()
    ref.load_state_dict(ck["model"])
    x = torch.randint(0, 257, (2, 32))
    assert torch.equal(plain(x)[0], ref(x)[0])


def test_warm_start_from_a_plain_model(train_run, tmp_path):
    train_run("--num_training_steps", "20", "--lr", "3e-3", save_dir=tmp_path / "warm")
    fresh = train_run("--num_training_steps", "2", save_dir=tmp_path / "fresh")
    warm = train_run("--num_training_steps", "2", "--warmed_up_model", tmp_path / "warm" / "model.pt", save_dir=tmp_path / "w2")
    assert warm["metrics"][0]["loss"] < fresh["metrics"][0]["loss"] - 0.5
    with pytest.raises(train.TrainingError, match="does not fit"):
        train_run("--model_config", "llama_20m", "--warmed_up_model", tmp_path / "warm" / "model.pt", save_dir=tmp_path / "w3")
    with pytest.raises(train.TrainingError, match="not found"):
        train_run("--warmed_up_model", tmp_path / "nope.pt", save_dir=tmp_path / "w4")


def test_ddp_two_ranks_equal_one_rank_with_accumulation(train_run, torchrun, tmp_path):
    """2 ranks x batch 4 see exactly the windows of 1 rank x 2 micro-steps x batch 4 (data.py)."""
    torchrun("--total_batch_size", "8", "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    train_run("--total_batch_size", "8", save_dir=tmp_path / "ga")
    assert max_diff(weights(tmp_path / "ddp"), weights(tmp_path / "ga")) < 1e-6
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_one_clear_error(train_run, tmp_path):
    cases = [
        (("--method", "lora_of_the_rings"), "unknown method"),
        (("--model_config", "llama_9000m"), "unknown model config"),
        (("--dataset", str(tmp_path / "missing.txt")), "neither 'builtin', an existing path"),
        (("--total_batch_size", "6"), "multiple of --batch_size"),
        (("--max_length", "512"), "exceeds the model's max_seq_len"),
        (("--scheduler", "triangle"), "unknown --scheduler"),
        (("--dtype", "float8"), "unknown --dtype"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError if "model config" in message or "builtin" in message else train.TrainingError,
                           match=message):
            train_run(*args, save_dir=tmp_path / "bad")
    (tmp_path / "short.txt").write_text("a few words only")
    with pytest.raises(ValueError, match="fewer than one window"):
        train_run("--dataset", tmp_path / "short.txt", save_dir=tmp_path / "bad")


def test_matrix_lr_ratio_scales_the_first_step_of_the_block_matrices_only(train_run, tmp_path):
    """Adam's first step moves each element by about the group's LR: with --matrix_lr_ratio 0.25 the blocks'
    matrices move a quarter as far as at ratio 1, the embedding and the norms just as far."""
    from model import get_config
    init = GPT(get_config("tiny", 257), seed=0).state_dict()
    moved = {}
    for ratio in (1.0, 0.25):
        out = tmp_path / f"r{ratio}"
        train_run("--num_training_steps", "1", "--warmup_steps", "0", "--lr", "1e-3", "--matrix_lr_ratio", ratio,
                  save_dir=out)
        w = weights(out)
        moved[ratio] = {k: (w[k] - init[k]).abs().max().item() for k in init}
        groups = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
        assert len(groups) == (2 if ratio == 1.0 else 3)  # ordinary runs keep the checkpoint layout they had
    for k in init:
        ratio = 0.25 if k.startswith("layers.") and init[k].dim() == 2 else 1.0
        assert moved[0.25][k] == pytest.approx(ratio * moved[1.0][k], rel=0.02), k
    assert moved[1.0]["layers.0.mlp.up_proj.weight"] == pytest.approx(1e-3, rel=0.02)
    with pytest.raises(train.TrainingError, match="for --method full only"):
        train_run("--method", "relora", "--matrix_lr_ratio", "0.5", save_dir=tmp_path / "bad")


def test_cli_prints_one_line_and_exits_2(data_dir, tmp_path):
    proc = run_cli("--method", "nope", "--data_dir", data_dir, "--save_dir", tmp_path / "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown method 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_or_mismatched_checkpoint_is_refused_and_left_intact(data_dir, train_run, tmp_path):
    save = tmp_path / "c"
    save.mkdir()
    (save / "ckpt.pt").write_bytes(b"not a checkpoint")
    proc = run_cli(*TINY, "--autoresume", "--data_dir", data_dir, "--save_dir", save)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert (save / "ckpt.pt").read_bytes() == b"not a checkpoint"
    train_run(save_dir=tmp_path / "m")
    before = (tmp_path / "m" / "ckpt.pt").read_bytes()
    with pytest.raises(train.TrainingError, match="model_config"):
        train_run("--model_config", "llama_9m", "--autoresume", save_dir=tmp_path / "m")
    assert (tmp_path / "m" / "ckpt.pt").read_bytes() == before


def test_nan_loss_stops_with_last_good_checkpoint_intact(train_run, tmp_path):
    save = tmp_path / "n"
    with pytest.raises(train.TrainingError, match="loss is"):
        train_run("--lr", "1e9", "--warmup_steps", "0", "--grad_clipping", "0", "--save_every", "1",
                  "--num_training_steps", "20", save_dir=save)
    ck = torch.load(save / "ckpt.pt", weights_only=True)
    assert 1 <= ck["step"] < 20
    assert all(math.isfinite(r.get("loss", 0.0)) for r in ck["records"])  # saved before the NaN appeared


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_marks_the_summary_exits_128_plus_n_and_autoresume_finishes(data_dir, tmp_path, signum, code):
    save = tmp_path / "s"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--num_training_steps", "100000",
           "--eval_every", "100000", "--data_dir", data_dir, "--save_dir", str(save)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("step 3 "):
            break
    proc.send_signal(signum)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == code, rest  # 128 + the signal: a script can tell it from a finished run
    assert "checkpoint saved" in rest
    step = torch.load(save / "ckpt.pt", weights_only=True)["step"]
    summary = json.loads((save / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == step and 3 <= step < 100000
    assert not (save / "model.pt").exists()
    done = run_cli(*TINY, "--num_training_steps", str(step + 2), "--autoresume", "--data_dir", data_dir, "--save_dir", save)
    assert done.returncode == 0 and "resumed from" in done.stdout
    assert json.loads((save / "summary.json").read_text())["steps"] == step + 2


def test_bench_writes_a_table_with_ratios(data_dir, tmp_path):
    import bench
    rc = bench.main(["--methods", "full", "--out", str(tmp_path / "b"), *TINY, "--num_training_steps", "2",
                     "--data_dir", data_dir, "--timing_rounds", "1", "--timing_steps", "2"])
    assert rc == 0
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| full |" in md and "1.00x" in md and "| 1.000 |" in md
    assert (tmp_path / "b" / "bench_loss.png").is_file() and (tmp_path / "b" / "bench_memory.png").is_file()



def test_lr_sweep_runs_every_cell_once_and_picks_the_best_lr(data_dir, tmp_path, capsys):
    """bench.py --lrs/--seeds: a two-cell toy sweep. A second invocation runs nothing again, also from
    sweep.json alone (cells/ deleted); a cell missing from both is the only one run again, with the same
    loss (a cell is a function of its flags); a sweep.json of other flags does not count."""
    import bench
    argv = ["--methods", "full", "--lrs", "1e-3,3e-2", "--seeds", "0", "--out", str(tmp_path / "s"), *TINY,
            "--num_training_steps", "3", "--data_dir", data_dir]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(c["method"], c["lr"], c["seed"]) for c in out["cells"]] == [("full", 1e-3, 0), ("full", 3e-2, 0)]
    for c in out["cells"]:  # each cell is a real train.py run with its own LR
        cfg = json.loads((tmp_path / "s" / "cells" / "full" / f"lr{c['lr']:g}_seed0" / "config.json").read_text())
        summary = json.loads((tmp_path / "s" / "cells" / "full" / f"lr{c['lr']:g}_seed0" / "summary.json").read_text())
        assert cfg["train"]["lr"] == c["lr"] and summary["val_loss"] == c["val_loss"]
    best = min(out["cells"], key=lambda c: c["val_loss"])["lr"]
    assert out["best_lr"] == {"full": best}
    md = (tmp_path / "s" / "sweep.md").read_text()
    assert f"| full | {best:g} (edge of grid) |" in md and (tmp_path / "s" / "sweep_lr.png").is_file()
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert "2 done before, 0 to run" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "s" / "cells")
    assert bench.main(argv) == 0
    assert "2 done before, 0 to run" in capsys.readouterr().out
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    record["cells"] = record["cells"][1:]
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(record))
    assert bench.main(argv + ["--jobs", "0"]) == 1  # report only: one cell missing
    assert "1 done before, 1 to run" in capsys.readouterr().out
    assert bench.main(argv) == 0
    assert "1 done before, 1 to run" in capsys.readouterr().out
    again = json.loads((tmp_path / "s" / "sweep.json").read_text())["cells"]
    assert [(c["lr"], c["val_loss"], c["train_loss"]) for c in again] == [(c["lr"], c["val_loss"], c["train_loss"]) for c in out["cells"]]
    shutil.rmtree(tmp_path / "s" / "cells")
    assert bench.main(argv + ["--warmup_steps", "2", "--jobs", "0"]) == 1
    assert "0 done before, 2 to run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- never lose a run


def test_a_second_run_in_the_same_save_dir_is_refused_and_a_stale_lock_taken_over(train_run, tmp_path):
    import socket
    save = tmp_path / "locked"
    save.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (save / "lock").write_text(f"{socket.gethostname()} {other.pid}")
        with pytest.raises(train.TrainingError, match=f"in use by process {other.pid}"):
            train_run(save_dir=save)
        assert not (save / "ckpt.pt").exists()
    finally:
        other.kill()
        other.wait()
    train_run(save_dir=save)  # the holder is gone: its lock is stale and taken over
    assert (save / "ckpt.pt").is_file() and not (save / "lock").exists()  # released at the end


def test_autoresume_of_a_finished_run_changes_nothing_and_a_longer_one_continues(train_run, tmp_path, capsys):
    save = tmp_path / "done"
    train_run(save_dir=save)
    files = ("ckpt.pt", "model.pt", "summary.json", "config.json", "metrics.jsonl", "loss.png")
    before = {f: (save / f).read_bytes() for f in files}
    again = train_run("--autoresume", save_dir=save)
    assert "has finished its 4 updates; nothing to do" in capsys.readouterr().out
    assert {f: (save / f).read_bytes() for f in files} == before
    assert again["summary"]["steps"] == 4 and again["summary"]["train_loss"] == json.loads(before["summary.json"])["train_loss"]
    longer = train_run("--autoresume", "--num_training_steps", "6", save_dir=save)
    assert longer["summary"]["steps"] == 6 and (save / "model.pt").read_bytes() != before["model.pt"]


# ----------------------------------------------------------------------------- one-line errors


def test_more_bad_inputs_fail_early_with_one_line_that_names_the_cause(train_run, data_dir, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(train.TrainingError, match="no CUDA GPU is visible"):
            train_run("--device", "cuda", save_dir=tmp_path / "c")
    with pytest.raises(train.TrainingError, match="--batch_size must be at least 1"):
        train_run("--batch_size", "0", save_dir=tmp_path / "b")
    with pytest.raises(train.TrainingError, match="--eval_every must be 0 .off. or a positive"):
        train_run("--eval_every", "-1", save_dir=tmp_path / "b")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(train.TrainingError, match="--save_dir .* cannot be created"):
        train_run("--data_dir", str(tmp_path / "fresh_cache"), save_dir=blocker / "sub")
    assert not (tmp_path / "fresh_cache").exists()  # refused before any data work
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    with pytest.raises(train.TrainingError) as e:
        train_run("--warmed_up_model", tmp_path / "garbage.pt", save_dir=tmp_path / "g")
    assert "model.pt written by train.py" in str(e.value) and "move it away" not in str(e.value)


def test_mismatched_warm_start_and_checkpoint_name_the_tensors_and_flags(train_run, tmp_path):
    train_run(save_dir=tmp_path / "plain")
    with pytest.raises(train.TrainingError) as e:
        train_run("--model_config", "llama_20m", "--warmed_up_model", tmp_path / "plain" / "model.pt", save_dir=tmp_path / "w")
    assert "does not fit --model_config llama_20m" in str(e.value)
    assert "embed_tokens.weight (257, 128) in the file vs (257, 256) here" in str(e.value)
    train_run("--method", "relora", "--lora_r", "8", "--relora", "2", "--scheduler", "cosine", save_dir=tmp_path / "r")
    with pytest.raises(train.TrainingError) as e:
        train_run("--method", "relora", "--lora_r", "4", "--relora", "2", "--scheduler", "cosine", "--autoresume", save_dir=tmp_path / "r")
    assert "lora_A" in str(e.value) and "--lora_r 8 (now 4)" in str(e.value)


# ----------------------------------------------------------------------------- tools


def test_wandb_offline_logs_the_records_of_metrics_jsonl(train_run, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    original = wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log",
                        lambda self, data, step=None, **kw: (logged.append((step, dict(data))), original(self, data, step=step, **kw)))
    out = train_run("--wandb", "--wandb_run_name", "t", save_dir=tmp_path / "wb")
    assert [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in out["metrics"]] == logged
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))  # an offline run, no network


@pytest.mark.parametrize("method", ["full", "switchlora", "lte"])  # full, and the two whose events use --log_every
def test_zero_eval_and_log_intervals_mean_only_at_the_end(train_run, method):
    out = train_run("--method", method, "--eval_every", "0", "--log_every", "0", "--save_every", "0")
    assert [r["step"] for r in out["metrics"] if "val_loss" in r] == [4]
    assert [r["step"] for r in out["metrics"] if "loss" in r] == [4]


def test_log_lines_go_through_the_progress_bar(data_dir, tmp_path):
    """On a terminal, validation lines never land on the bar's line, and the finished bar shows once."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--num_training_steps", "6",
                             "--eval_every", "3", "--data_dir", data_dir, "--save_dir", str(tmp_path / "p")],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")  # the terminal's own line ends
    lines = [seg for line in text.split("\n") for seg in [line.split("\r")[-1]]]  # what stays visible on each line
    assert any("val_loss" in line for line in lines)
    assert not any("val_loss" in line and "%|" in line for line in text.replace("\r", "\n").split("\n"))
    assert sum("100%|" in line for line in lines) == 1
