"""ReLoRA (relora.py): the claims of its docstring, each as a test (float64 on tiny dims unless noted)."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import data
import memory
import relora
import train
from model import GPT, GPTConfig, get_config, load_plain
from train import TrainConfig, default_optimizer


pytestmark = pytest.mark.usefixtures("one_thread")


def small_gpt(seed=0, dtype=torch.float64):
    cfg = GPTConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=16, intermediate_size=24, max_seq_len=16)
    return GPT(cfg, seed=seed).to(dtype)


def wrapped(seed=0, dtype=torch.float64, **kw):
    model, cfg = small_gpt(seed, dtype), relora.Config(lora_r=kw.pop("lora_r", 4), **kw)
    relora.wrap(model, cfg, TrainConfig(seed=seed))
    return model, cfg


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, relora.ReLoRALinear)]


def randomize_B(model, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))


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


def test_weight_decay_reaches_the_matrices_only():
    """train.py's default AdamW: --weight_decay on A, B, embeddings and lm_head, not on the RMSNorm
    gains (the original decays every trainable tensor); the frozen W is not in the optimizer at all."""
    model, _ = wrapped()
    opt = default_optimizer(model, TrainConfig(weight_decay=0.1))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = {n: decay.get(id(p)) for n, p in model.named_parameters()}
    assert all(v is None for n, v in names.items() if n.endswith("proj.weight"))  # frozen W
    assert all(v == 0.1 for n, v in names.items() if "lora_" in n or n in ("embed_tokens.weight", "lm_head.weight"))
    assert all(v == 0.0 for n, v in names.items() if "norm" in n)


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


def f32_logits(model, x):
    """The function the stored weights define, evaluated in float32 (no bf16 compute noise)."""
    return logits(copy.deepcopy(model).float(), x)


def test_merge_in_bf16_storage_rounds_once_and_keeps_the_function():
    """--storage_dtype bfloat16: W, A and B are bf16; the merge sums in float32 and rounds W once."""
    model, cfg = wrapped(dtype=torch.bfloat16)
    layers = lora_layers(model)
    assert all(m.lora_A.dtype == m.lora_B.dtype == m.weight.dtype == torch.bfloat16 for m in layers)
    randomize_B(model, scale=0.01)  # s B A about as large as W, as after some training
    expected = [(m.weight.float() + m.scaling * m.lora_B.float() @ m.lora_A.float()).bfloat16() for m in layers]
    before, bf16_noise = f32_logits(model, X), (logits(model, X).float() - f32_logits(model, X)).abs().max()
    W_old = [m.weight.clone() for m in layers]
    relora.after_step(cfg.relora, model, default_optimizer(model, TrainConfig()), cfg, TrainConfig(seed=0))
    assert all(torch.equal(m.weight, e) for m, e in zip(layers, expected))  # the float32 sum, rounded once
    moved = (f32_logits(model, X) - before).abs().max()
    assert moved <= bf16_noise  # the merge moves the logits less than bf16 computation itself does
    for m, w in zip(layers, W_old):  # a reset without the merge would move them ~100x more
        m.weight.data.copy_(w)
    assert (f32_logits(model, X) - before).abs().max() > 20 * bf16_noise


def test_export_returns_cpu_tensors_and_merges_one_layer_at_a_time():
    """On fake tensors of a model on the meta device (standing in for a GPU): export moves each merged
    weight to the CPU at once, so the device holds at most one extra layer, never a merged copy of all."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = GPTConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=64, intermediate_size=192, max_seq_len=16)
    meter = memory.MemoryMeter("meta", round_to=0)
    with FakeTensorMode(), meter:
        with torch.device("meta"):
            model = GPT(cfg)
        model.plan("meta", torch.float32)
        relora.wrap(model, relora.Config(lora_r=4), TrainConfig())
        model.materialize()
        before = meter.peak = sum(meter.now.values())
        sd = relora.export(model, relora.Config(lora_r=4))
        extra = meter.peak - before
    layer_bytes = [4 * m.weight.numel() for m in lora_layers(model)]
    assert all(v.device.type == "cpu" for v in sd.values()) and set(sd) == set(GPT(cfg).state_dict())
    assert extra <= 2 * max(layer_bytes) < sum(layer_bytes) / 4  # (keeping every merged W there: sum)


# ----------------------------------------------------------------------------- optimizer reset


def trained_two_steps(**kw):
    model, cfg = wrapped(relora=3, **kw)
    randomize_B(model)
    opt = default_optimizer(model, TrainConfig())
    torch.manual_seed(0)  # the adapters' dropout masks
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


def test_the_event_runs_on_fake_tensors(monkeypatch, tmp_path):
    """memory.py's estimate: update 2 is a merge and an optimizer reset (EVENT_EVERY_UPDATE), on fake
    tensors, so nothing in them may read a tensor into Python; the metrics come back as 0-dim tensors."""
    events, hook = [], relora.after_step
    monkeypatch.setattr(relora, "after_step", lambda *a: events.append(hook(*a)) or events[-1])
    config = tmp_path / "small.json"  # small_gpt's shape: fake tensors cost per op, not per byte
    config.write_text(json.dumps({"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "max_sequence_length": 16}))
    for mode in ([], ["--reset_optimizer_on_relora", "false", "--optimizer_magnitude_pruning", "0.9"],
                 ["--reset_optimizer_on_relora", "false", "--optimizer_random_pruning", "0.5"]):
        argv = ["--method", "relora", "--model_config", str(config), "--lora_r", "4", "--batch_size", "1",
                "--max_length", "8", "--warmup_steps", "1"] + mode
        memory.estimate(argv, vocab_size=23, device_kind="cpu")
        assert events[-2] == {} and set(events[-1]) == {"relora_merges", "optimizer_zeroed_frac"}
        assert torch.is_tensor(events[-1]["optimizer_zeroed_frac"]) and events[-1]["optimizer_zeroed_frac"].dim() == 0


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
    (45, 5, 10, 4, "multiple of 10, not 45"), (40, 12, 10, 4, "must not exceed"), (40, 5, 10, 0, "between 1 and")])
def test_jagged_cosine_rejects_impossible_settings(steps, warmup, cycle, wr, match):
    train = TrainConfig(num_training_steps=steps, warmup_steps=warmup, scheduler="cosine_restarts")
    with pytest.raises(ValueError, match=match):
        relora.lr_multiplier(0, relora.Config(relora=cycle, restart_warmup_steps=wr), train)


def test_no_restart_period_gives_the_plain_cosine():
    """--relora 0 (plain LoRA) under cosine_restarts, ReLoRA's default: no restarts, train.py's cosine."""
    train_cfg = TrainConfig(num_training_steps=37, warmup_steps=5, scheduler="cosine_restarts")
    plain = TrainConfig(num_training_steps=37, warmup_steps=5, scheduler="cosine")
    cfg = relora.Config(relora=0)
    assert [relora.lr_multiplier(t, cfg, train_cfg) for t in range(37)] == \
        pytest.approx([train.lr_schedule(t, plain) for t in range(37)], abs=1e-12)


def test_the_jagged_cosine_is_the_default_and_a_bad_length_says_what_to_do(train_run):
    assert train.parse_args(["--method", "relora"])[0].scheduler == "cosine_restarts"  # Table 6: no jagged LR diverged
    assert train.parse_args(["--method", "full"])[0].scheduler == "cosine"  # other methods keep train.py's
    with pytest.raises(ValueError) as e:  # train.py prints it as one line, exit code 2
        train_run("--method", "relora", "--num_training_steps", "250")  # with the default --relora 100
    assert "use --num_training_steps 200 or 300, --relora 50, or train.py's --scheduler cosine" in str(e.value)


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
    # float32 rounding of the exported W + sBA, through 4 layers: 2.4e-5 at ReLoRA's default lr 4e-3
    assert torch.allclose(logits(plain, x), logits(model, x), rtol=0, atol=1e-4)


def test_bf16_storage_resumes_exactly(train_run, tmp_path):
    bf16 = RUN + ["--storage_dtype", "bfloat16"]
    train_run(*bf16, save_dir=tmp_path / "a")
    train_run(*bf16, "--stop_at_step", "3", save_dir=tmp_path / "b")  # the event at t = 2 is in it
    train_run(*bf16, "--autoresume", save_dir=tmp_path / "b")
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert ck_a["model"]["layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert all(torch.equal(v, ck_b["model"][k]) for k, v in ck_a["model"].items())


def test_per_layer_updates_equal_ordinary_updates(train_run, tmp_path):
    """--per_layer_updates steps each parameter inside its gradient hook; ReLoRA's events run after the
    backward either way, so 6 updates with two merges and two (random-pruning) resets agree."""
    args = RUN + ["--grad_clipping", "0"]
    a = train_run(*args, save_dir=tmp_path / "a")
    b = train_run(*args, "--per_layer_updates", save_dir=tmp_path / "b")
    ev = lambda out: [(r["method/relora_merges"], r["method/optimizer_zeroed_frac"])  # noqa: E731
                      for r in out["metrics"] if "method/relora_merges" in r]
    assert ev(a) == ev(b) and len(ev(a)) == 2
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    for k, v in ck_a["model"].items():
        assert torch.allclose(v, ck_b["model"][k], rtol=0, atol=1e-6), k
    assert ck_a["optimizer"]["state"].keys() == ck_b["optimizer"]["state"].keys()


def test_warm_start_continues_the_data_after_the_warm_up(train_run, data_dir, tmp_path):
    """The warm-up's model.pt records its `steps`; the ReLoRA phase restarts its scheduler and step
    counter at 0 but trains on the batches after the warm-up's, as the original does."""
    warm = tmp_path / "warm"
    train_run("--method", "full", "--num_training_steps", "3", save_dir=warm)
    args = ["--method", "relora", "--lora_r", "8", "--relora", "2", "--restart_warmup_steps", "1",
            "--num_training_steps", "4", "--warmed_up_model", warm / "model.pt"]
    out = train_run(*args, save_dir=tmp_path / "r")
    tokens = data.TokenData(data.prepare("builtin", tokenizer="bytes", data_dir=data_dir, log=lambda *a: None), 32, 0)
    plain = load_plain(warm / "model.pt")  # B = 0: the wrapped model's first loss is the warm model's
    with torch.no_grad():
        loss_on = lambda step: plain(*tokens.batch(step, 4, 4))[1].item()  # noqa: E731 (TINY: 4 x 32)
        first = out["metrics"][0]["loss"]
        assert first == pytest.approx(loss_on(3), rel=1e-6)  # batch 3: the first one the warm-up did not see
        assert first != pytest.approx(loss_on(0), rel=1e-4)  # not a replay of the warm-up's first batch
        cold = GPT(plain.config)(*tokens.batch(3, 4, 4))[1].item()
        assert first != pytest.approx(cold, rel=1e-4)  # and the warm weights were loaded
    # the offset survives a resume: stopped and resumed == unbroken
    train_run(*args, "--stop_at_step", "1", save_dir=tmp_path / "s")
    train_run(*args, "--autoresume", save_dir=tmp_path / "s")
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "rs")
    assert all(torch.allclose(v, ck_b["model"][k], rtol=0, atol=1e-6) for k, v in ck_a["model"].items())


def test_two_ranks_agree_after_restarts(torchrun, tmp_path):
    """In bf16 storage (the originals' setting); the restart randomness is the same in any dtype."""
    # --check_ranks_every 1: train.py raises if the ranks' weights differ after any update
    torchrun(*RUN, "--storage_dtype", "bfloat16", "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    with open(tmp_path / "ddp" / "metrics.jsonl") as fh:
        recs = [json.loads(line) for line in fh]
    assert [r["method/relora_merges"] for r in recs if "method/relora_merges" in r] == [1, 2]
    assert os.path.isfile(tmp_path / "ddp" / "model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_relora_peaks_well_below_full_rank_at_llama_1b(storage):
    """The docstring's table: r 512 on llama_1b, 0.64x of full-rank's peak in either storage dtype."""
    common = ["--model_config", "llama_1b", "--batch_size", "1", "--max_length", "256", "--warmup_steps", "1",
              "--storage_dtype", storage]
    full = memory.estimate(["--method", "full"] + common)["peak_bytes"]
    ours = memory.estimate(["--method", "relora", "--lora_r", "512"] + common)["peak_bytes"]
    assert ours < 0.7 * full, (ours / 2**30, full / 2**30)
