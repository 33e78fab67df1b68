"""memory.py: the fake-tensor estimate against real runs, and what its breakdown claims.

The check that matters: for every method, the peak the estimator computes on fake tensors equals
(within 15%) the peak of the CPU allocator's own timeline during the same two updates run for real."""

import json

import pytest

import memory

METHODS = ["full", "relora", "switchlora", "golore", "lte", "loqt"]
SMALL = ["--model_config", "tiny", "--batch_size", "4", "--max_length", "64"]  # 4: LTE's heads need a divisible batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", METHODS)
def test_estimate_matches_a_real_cpu_run(method):
    argv = ["--method", method] + SMALL
    estimate = memory.estimate(argv, vocab_size=257, device_kind="cpu")
    real = memory.measure(argv, vocab_size=257)
    assert abs(estimate["peak_bytes"] - real) <= 0.15 * real, (estimate["peak_bytes"], real)
    parts = sum(estimate[k] for k in ("weights_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "temp_bytes"))
    assert parts == estimate["peak_bytes"]  # the breakdown is a partition of the peak


def test_full_rank_breakdown_is_what_adam_holds():
    """Full-rank AdamW in float32: at the optimizer step the weights, gradients and both moments all exist."""
    r = memory.estimate(["--method", "full", "--model_config", "tiny", "--batch_size", "1", "--max_length", "16",
                         "--grad_clipping", "0"], vocab_size=257, device_kind="cpu")  # few activations
    n = r["total_params"]
    assert r["weights_bytes"] == 4 * n + 2 * 4 * 256 * 32  # + the two rotary tables (max_seq_len x head_dim)
    assert r["grad_bytes"] == 4 * n and r["peak_phase"] == "optimizer"
    assert 8 * n <= r["optimizer_bytes"] <= 8 * n + 4 * 64  # two moments, plus a scalar step per tensor


def test_bf16_storage_halves_the_weights_and_offloaded_bytes_are_apart(tmp_path):
    f32 = memory.estimate(["--method", "full"] + SMALL, vocab_size=257)
    bf16 = memory.estimate(["--method", "full"] + SMALL + ["--storage_dtype", "bfloat16"], vocab_size=257)
    assert bf16["weights_bytes"] < 0.6 * f32["weights_bytes"]
    pools = memory.estimate(["--method", "switchlora"] + SMALL, vocab_size=257)
    assert pools["host_bytes"] > 0  # the candidate pools live on the host and are not in the device peak


def test_cli_writes_json_markdown_and_plot(tmp_path):
    rc = memory.main(["--methods", "full,relora", "--model_config", "tiny,llama_9m", "--vocab_size", "257",
                      "--out", str(tmp_path), "--batch_size", "2", "--max_length", "32"])
    assert rc == 0
    js = json.loads((tmp_path / "memory.json").read_text())
    entry = js["methods"]["relora"]
    for key in ("peak_bytes", "weights_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "temp_bytes", "peak_phase"):
        assert key in entry
    assert set(js["presets"]) == {"tiny", "llama_9m"}
    assert "| tiny | relora |" in (tmp_path / "memory.md").read_text()
    assert (tmp_path / "memory.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_estimate_matches_a_real_run_at_llama_130m(method):
    argv = ["--method", method, "--model_config", "llama_130m", "--batch_size", "4", "--max_length", "256"]
    estimate = memory.estimate(argv, device_kind="cpu")["peak_bytes"]
    real = memory.measure(argv)
    assert abs(estimate - real) <= 0.15 * real, (estimate, real)


# ----------------------------------------------------------------------------- --fit: the largest micro-batch in a budget

FIT = ["--model_config", "tiny", "--max_length", "32"]


def test_fit_finds_the_largest_batch_that_the_estimator_says_fits(tmp_path):
    """A budget between the estimates at batch 2 and 3 (measured here): the search answers 2, and batch 3
    is over by the same estimator; LTE (4 heads) searches multiples of 4 only."""
    est = lambda m, b: memory.estimate(["--method", m] + FIT + ["--batch_size", str(b)], vocab_size=257)["peak_bytes"]  # noqa: E731
    p2, p3 = est("full", 2), est("full", 3)
    assert p2 < p3
    budget = (p2 + p3) // 2
    rc = memory.main(["--fit", repr(budget / memory.GIB), "--methods", "full", "--vocab_size", "257",
                      "--out", str(tmp_path), "--fit_max_batch", "4"] + FIT)
    assert rc == 0
    js = json.loads((tmp_path / "fit.json").read_text())
    r = js["methods"]["full"]
    assert (r["batch_size"], r["step"], r["next_batch_size"], r["capped"]) == (2, 1, 3, False)
    assert r["peak_bytes"] == p2 <= budget < r["next_peak_bytes"] == p3  # 2 fits, 3 does not
    assert r["estimates"] <= 4  # 1, 2, 4, then 3
    assert js["config"]["budget_bytes"] == budget
    assert set(js["modes"]) == set(memory.fit_modes()) - {"plain"}
    per_layer = js["modes"]["per_layer_updates"]["methods"]["full"]  # no gradients at the step: more fits
    assert per_layer["batch_size"] >= 2 and per_layer["peak_bytes"] <= budget
    assert per_layer["next_peak_bytes"] is None or per_layer["next_peak_bytes"] > budget
    assert "| full | 2 (" in (tmp_path / "fit.md").read_text()


def test_fit_respects_lte_heads_and_says_what_helps_when_nothing_fits():
    lte = memory.fit_batch(["--method", "lte"] + FIT, memory.estimate(["--method", "lte"] + FIT + ["--batch_size", "4"],
                                                                      vocab_size=257)["peak_bytes"], vocab_size=257)
    assert (lte["step"], lte["batch_size"], lte["next_batch_size"]) == (4, 4, 8)  # 4 heads: only multiples of 4
    p1 = memory.estimate(["--method", "full"] + FIT + ["--batch_size", "1"], vocab_size=257)["peak_bytes"]
    r = memory.fit_batch(["--method", "full"] + FIT, p1 - 1, vocab_size=257)
    assert r["batch_size"] == 0 and r["peak_bytes"] is None and r["min_peak_bytes"] == p1
    alts = memory.fit_alternatives("full", ["--method", "full"] + FIT, p1 - 1, 1, vocab_size=257)
    flags = {a["flags"]: a for a in alts}
    assert flags["--storage_dtype bfloat16"]["fits"]  # half the weights: under a budget 1 byte short
    assert "n/a" == memory.fit_cell(None) and "fits with" in memory.fit_cell(dict(r, alternatives=alts))
