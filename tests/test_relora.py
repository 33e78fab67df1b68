"""ReLoRA (relora.py): the claims of its docstring, each as a test (float64 on tiny dims unless noted)."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import relora
from model import GPT, GPTConfig, get_config, load_plain
from train import TrainConfig, default_optimizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_gpt(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=16, intermediate_size=24, max_seq_len=16)
    return GPT(cfg).double()


def wrapped(seed=0, **kw):
    model, cfg = small_gpt(seed), relora.Config(lora_r=kw.pop("lora_r", 4), **kw)
    relora.wrap(model, cfg, TrainConfig(seed=seed))
    return model, cfg


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, relora.ReLoRALinear)]


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


X = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- layer and surgery


def test_identity_at_init_and_what_is_trainable():
    base = small_gpt()
    model, cfg = wrapped()
    assert torch.equal(logits(base, X), logits(model, X))  # B = 0: exactly the plain model
    layers = lora_layers(model)
    assert len(layers) == 7 * 2 and all(m.lora_A.abs().sum() > 0 for m in layers)  # A random, not zeroed
    # trainable = everything of the plain model except the adapted W, plus r (m + n) per layer
    n_adapted = sum(m.weight.numel() for m in layers)
    n_lora = sum(cfg.lora_r * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == base.num_params() - n_adapted + n_lora
    model.train()
    model(X, X)[1].backward()
    assert all(m.weight.grad is None for m in layers)  # frozen W gets no gradient
    assert all(m.lora_B.grad.abs().sum() > 0 for m in layers)  # live adapter from step 0
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight"):
        assert model.get_parameter(name).grad is not None  # full-rank and trainable


def test_original_zero_A_flag_gives_a_dead_adapter():
    model, _ = wrapped(zero_lora_A_at_wrap=True)
    model(X, X)[1].backward()
    assert all(m.lora_A.grad.abs().sum() == 0 and m.lora_B.grad.abs().sum() == 0 for m in lora_layers(model))


@pytest.mark.parametrize("kw, match", [
    (dict(lora_r=17), "exceeds the smaller dimension"),
    (dict(optimizer_magnitude_pruning=0.9), "exactly one optimizer reset mode"),
    (dict(reset_optimizer_on_relora=False), "exactly one optimizer reset mode"),
    (dict(optimizer_random_pruning=1.5, reset_optimizer_on_relora=False), r"in \[0, 1\)"),
])
def test_impossible_settings_fail_at_wrap(kw, match):
    with pytest.raises(ValueError, match=match):
        wrapped(**kw)


def test_merge_and_reinit_preserves_the_function():
    model, cfg = wrapped()
    randomize_B(model)
    before = logits(model, X)
    layers = lora_layers(model)
    ids = [(id(m.weight), id(m.lora_A), id(m.lora_B)) for m in layers]
    A_old = [m.lora_A.clone() for m in layers]
    W_old = [m.weight.clone() for m in layers]
    opt = default_optimizer(model, TrainConfig())
    relora.after_step(cfg.relora, model, opt, cfg, TrainConfig(seed=0))  # the event at t = P
    assert torch.allclose(logits(model, X), before, rtol=0, atol=1e-12)
    for m, a, w, i in zip(layers, A_old, W_old, ids):
        assert (id(m.weight), id(m.lora_A), id(m.lora_B)) == i  # same Parameter objects
        assert torch.count_nonzero(m.lora_B) == 0 and not torch.equal(m.lora_A, a)
        assert not torch.equal(m.weight, w)  # the delta went into W (a reset without merge fails here)
    W_once = [m.weight.clone() for m in layers]
    for m in layers:  # merging twice in a row adds s * 0 * A: harmless
        m.merge_and_reinit(torch.Generator().manual_seed(3))
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, W_once))


def test_export_is_the_plain_merged_model_and_leaves_the_training_model_alone():
    model, cfg = wrapped()
    randomize_B(model)
    snapshot = copy.deepcopy(model.state_dict())
    sd = relora.export(model, cfg)
    plain = small_gpt()
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd)
    assert torch.allclose(logits(plain, X), logits(model, X), rtol=0, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


# ----------------------------------------------------------------------------- optimizer reset


def trained_two_steps(**kw):
    model, cfg = wrapped(relora=3, **kw)
    randomize_B(model)
    opt = default_optimizer(model, TrainConfig())
    for _ in range(2):
        model.train()
        model(X, X)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, cfg, opt


@pytest.mark.parametrize("mode", ["reset", "random", "magnitude"])
def test_reset_touches_only_lora_moments_and_prunes_the_right_fraction(mode):
    p = 0.6
    kw = {"reset": {}, "random": dict(reset_optimizer_on_relora=False, optimizer_random_pruning=p),
          "magnitude": dict(reset_optimizer_on_relora=False, optimizer_magnitude_pruning=p)}[mode]
    model, cfg, opt = trained_two_steps(**kw)
    before = {n: copy.deepcopy(opt.state[q]) for n, q in model.named_parameters() if q.requires_grad}
    g = torch.Generator().manual_seed(0)
    frac = relora.reset_optimizer_state(model, opt, cfg, g)
    n_lora = 0
    for name, q in model.named_parameters():
        if not q.requires_grad:
            continue
        old, new = before[name], opt.state[q]
        assert torch.equal(old["step"], new["step"])  # Adam's step counter is never reset
        if "lora_" not in name:
            assert all(torch.equal(old[k], new[k]) for k in old)  # bit-identical
            continue
        n_lora += 1
        for key in ("exp_avg", "exp_avg_sq"):
            o, s = old[key], new[key]
            kept = s != 0
            assert torch.equal(s[kept], o[kept])  # survivors are untouched, never rescaled
            n, n_kept = s.numel(), int(kept.sum())
            if mode == "reset":
                assert n_kept == 0
            elif mode == "magnitude":
                assert n_kept == n - round(p * n)  # exact count (no state is exactly zero beforehand)
                assert o[kept].abs().min() >= o[~kept].abs().max()
    assert n_lora == 2 * len(lora_layers(model))
    expected = {"reset": 1.0, "random": p, "magnitude": p}[mode]
    assert abs(frac - expected) < (0.05 if mode == "random" else 0.01)  # random: ~3500 Bernoulli draws


def test_random_pruning_mask_comes_from_the_generator():
    (ma, cfg, oa), (mb, _, ob) = (trained_two_steps(reset_optimizer_on_relora=False, optimizer_random_pruning=0.5)
                                  for _ in range(2))
    torch.manual_seed(123)  # the global RNG must not matter
    relora.reset_optimizer_state(ma, oa, cfg, torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    relora.reset_optimizer_state(mb, ob, cfg, torch.Generator().manual_seed(7))
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        if pa.requires_grad:
            assert torch.equal(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"])


def test_magnitude_pruning_keeps_exactly_the_largest_entries():
    t = torch.tensor([0.5, -3.0, 2.0, 0.0, -0.1, 2.0, 1.0, -2.0])
    keep = relora.magnitude_keep_mask(t, 0.5)  # 4 of 8, ties at |2| broken to an exact count
    assert keep.sum() == 4 and keep[1] and keep[6] == 0 and keep[0] == 0
    assert t[keep].abs().min() >= t[~keep].abs().max()
    assert relora.magnitude_keep_mask(torch.zeros(10), 0.9).sum() == 1  # all ties: still keeps 1
    # beyond torch.quantile's 2**24-element limit
    big = torch.randn(2 ** 24 + 3, generator=torch.Generator().manual_seed(0))
    keep = relora.magnitude_keep_mask(big, 0.9)
    assert int(keep.sum()) == big.numel() - round(0.9 * big.numel())
    assert big[keep].abs().min() >= big[~keep].abs().max()


# ----------------------------------------------------------------------------- schedule


def test_jagged_cosine_values():
    T, w0, wr, P, rho = 40, 5, 4, 10, 0.1
    train = TrainConfig(num_training_steps=T, warmup_steps=w0, scheduler="cosine_restarts", min_lr_ratio=rho)
    cfg = relora.Config(relora=P, restart_warmup_steps=wr)
    lam = [relora.lr_multiplier(t, cfg, train) for t in range(T)]
    env = lambda t: rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * (t - w0) / (T - w0)))  # noqa: E731
    assert lam[:w0] == [t / w0 for t in range(w0)]  # first warmup from 0
    for k in (1, 2, 3):
        assert lam[k * P] == 0.0  # LR is exactly 0 at each restart boundary
        for j in range(wr):  # linear ramp towards the envelope value at the end of the re-warmup
            assert lam[k * P + j] == pytest.approx(j / wr * env(k * P + wr))
        for t in range(k * P + wr, min(T, (k + 1) * P)):
            assert lam[t] == pytest.approx(env(t))  # back on the global cosine envelope
    assert all(lam[t] == pytest.approx(env(t)) for t in range(w0, P))  # no dip in the first cycle
    assert relora.lr_multiplier(3, cfg, TrainConfig(scheduler="cosine")) is None  # train.py's default applies


@pytest.mark.parametrize("steps, warmup, cycle, wr, match", [
    (45, 5, 10, 4, "divisible"), (40, 12, 10, 4, "must not exceed"), (40, 5, 10, 0, "between 1 and")])
def test_jagged_cosine_rejects_impossible_settings(steps, warmup, cycle, wr, match):
    train = TrainConfig(num_training_steps=steps, warmup_steps=warmup, scheduler="cosine_restarts")
    with pytest.raises(ValueError, match=match):
        relora.lr_multiplier(0, relora.Config(relora=cycle, restart_warmup_steps=wr), train)


def test_divisibility_error_reaches_the_command_line(train_run):
    with pytest.raises(ValueError, match="divisible"):
        train_run("--method", "relora", "--relora", "3", "--scheduler", "cosine_restarts")


# ----------------------------------------------------------------------------- the point of the paper


def accumulated_update_rank(relora_every, steps=120, n=16, r=2):
    """Fit a full-rank target with one adapted layer; rank of W_T - W_0 (float64)."""
    torch.manual_seed(0)
    toy = nn.Module()
    toy.mlp = nn.Linear(n, n, bias=False).double()
    cfg = relora.Config(lora_r=r, lora_alpha=r, lora_dropout=0.0, relora=relora_every)
    relora.wrap(toy, cfg, TrainConfig(seed=0))
    W0 = toy.mlp.weight.clone()
    target = torch.randn(n, n, dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in toy.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    events = 0
    for t in range(steps):
        x = torch.randn(64, n, dtype=torch.float64)
        ((toy.mlp(x) - x @ target.T) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        events += bool(relora.after_step(t, toy, opt, cfg, TrainConfig(seed=0)))
    delta = relora.export(toy, cfg)["mlp.weight"] - W0
    s = torch.linalg.svdvals(delta)
    return int((s > 1e-8 * s[0]).sum()), events


def test_restarts_reach_rank_above_r_while_lora_stays_at_r():
    rank_relora, events = accumulated_update_rank(relora_every=20)
    rank_lora, no_events = accumulated_update_rank(relora_every=0)
    assert events == 5 and no_events == 0
    assert rank_lora <= 2
    assert rank_relora > 2 * 3  # well above r after 5 restarts (at most 2 * 6 = 12)


# ----------------------------------------------------------------------------- whole runs

RUN = ["--method", "relora", "--relora", "2", "--scheduler", "cosine_restarts", "--restart_warmup_steps", "1",
       "--lora_r", "8", "--num_training_steps", "6", "--reset_optimizer_on_relora", "false",
       "--optimizer_random_pruning", "0.5"]


def test_resume_equals_unbroken_run_and_model_pt_is_the_wrapped_model(train_run, tmp_path):
    full = train_run(*RUN, save_dir=tmp_path / "a")
    merges = [r["method/relora_merges"] for r in full["metrics"] if "method/relora_merges" in r]
    assert merges == [1, 2]  # after updates t = 2 and t = 4 (0-based), i.e. at 3 and 5 done
    part = train_run(*RUN, "--stop_at_step", "4", save_dir=tmp_path / "b")  # the event at t = 2 is in it
    assert part["summary"]["interrupted"]
    train_run(*RUN, "--autoresume", save_dir=tmp_path / "b")
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    for k, v in ck_a["model"].items():
        assert torch.allclose(v, ck_b["model"][k], rtol=0, atol=1e-6), k
    # model.pt (plain GPT) == the wrapped training model, in eval mode
    plain = load_plain(tmp_path / "a" / "model.pt")
    model = GPT(get_config("tiny", plain.config.vocab_size))
    relora.wrap(model, relora.Config(**ck_a["method_config"]), TrainConfig(seed=0))
    model.load_state_dict(ck_a["model"])
    assert any(m.lora_B.abs().sum() > 0 for m in lora_layers(model))  # the adapter is live at the end
    x = torch.randint(0, plain.config.vocab_size, (2, 32))
    assert torch.allclose(logits(plain, x), logits(model, x), rtol=0, atol=1e-5)


def test_warm_start_recipe(train_run, tmp_path):
    warm = tmp_path / "warm"
    train_run("--method", "full", "--num_training_steps", "2", save_dir=warm)
    args = ["--num_training_steps", "2", "--warmed_up_model", warm / "model.pt"]
    a = train_run("--method", "full", *args, save_dir=tmp_path / "f")
    b = train_run("--method", "relora", "--lora_r", "8", *args, save_dir=tmp_path / "r")
    # the first update's loss is computed on the warm model itself in both runs (identity at wrap)
    assert b["metrics"][0]["loss"] == pytest.approx(a["metrics"][0]["loss"], rel=1e-6)


def test_two_ranks_agree_after_restarts(torchrun, tmp_path):
    # --check_ranks_every 1: train.py raises if the ranks' weights differ after any update
    torchrun(*RUN, "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    with open(tmp_path / "ddp" / "metrics.jsonl") as fh:
        recs = [json.loads(line) for line in fh]
    assert [r["method/relora_merges"] for r in recs if "method/relora_merges" in r] == [1, 2]
    assert os.path.isfile(tmp_path / "ddp" / "model.pt")
