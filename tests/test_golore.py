"""GoLore / GaLore (golore.py): the layer, the projection event, GaLore's optimizer, per-layer updates,
bf16 storage, fake tensors, DDP agreement, resume, export, the toy.

The unit tests use a one-block float64 GPT whose adapted linears cover all three shapes:
q/k/v/o are square (8x8), gate/up tall (12x8), down wide (8x12)."""

import dataclasses
import json
import math
import os

import pytest
import torch

import golore
import memory
import train
from conftest import TINY
from model import GPT, GPTConfig, adapted_linear_names, get_config, load_plain


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(seed=0, dtype=torch.float64):
    return GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, intermediate_size=12, max_seq_len=16), seed).to(dtype)


def batch(seed, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 11, (B, T + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def setup(r=4, gap=3, rand_ratio=0.8, scale=1.0, steps=10, lr=1e-2, seed=0, weight_decay=0.0, dtype=torch.float64,
          factor_dtype="storage", optimizer="adamw", adam8bit_embeddings=False):
    cfg = golore.Config(r=r, scale=scale, update_proj_gap=gap, rand_ratio=rand_ratio, factor_dtype=factor_dtype,
                        optimizer=optimizer, adam8bit_embeddings=adam8bit_embeddings)
    tc = train.TrainConfig(num_training_steps=steps, lr=lr, seed=seed, weight_decay=weight_decay)
    model = golore.wrap(tiny_gpt(seed, dtype), cfg, tc)
    return model, golore.make_optimizer(model, cfg, tc), cfg, tc


def update(model, opt, cfg, tc, step, data_seed=None, before=None):
    """One update in train.py's order (no clipping); `before(model, opt)` runs just before before_step.
    -> the events after_step logs."""
    golore.step_start(step, model, cfg, tc)
    x, y = batch(step if data_seed is None else data_seed)
    model(x, y)[1].backward()
    if before:
        before(model, opt)
    golore.before_step(step, model, opt, cfg, tc)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return golore.after_step(step, model, opt, cfg, tc)


def layers(model):
    """name -> GoLoreLinear of a wrapped model, or name -> nn.Linear of the layers GoLore adapts in a plain one."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, golore.GoLoreLinear)}
    return found or {n: model.get_submodule(n) for n in adapted_linear_names(model)}


def test_identity_at_init_and_what_trains():
    plain, (model, opt, cfg, tc) = tiny_gpt(), setup()
    x, _ = batch(0)
    assert torch.equal(plain(x)[0], model(x)[0])  # R = 0, so W_eff = W exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in layers(model).items():
        assert isinstance(layer, golore.GoLoreLinear)
        assert name + ".factor" in trainable and name + ".weight" not in trainable
        assert name + ".proj" in dict(model.named_buffers())
    assert len(layers(model)) == 7
    m_n = [layer.weight.shape for layer in layers(model).values()]
    frozen = sum(m * n for m, n in m_n)
    assert model.num_params(trainable_only=True) == plain.num_params() - frozen + sum(max(s) * cfg.r for s in m_n)
    # a regular step: W and P get no gradient, R does
    update(model, opt, cfg, tc, 0)
    golore.step_start(1, model, cfg, tc)
    model(*batch(1))[1].backward()
    for layer in layers(model).values():
        assert layer.weight.grad is None and layer.proj.grad is None and layer.factor.grad is not None


@pytest.mark.parametrize("rand", [False, True])
@pytest.mark.parametrize("r", [4, 8])  # 8 = min(out, in) of every layer: the projector is a full basis
def test_projector_orthonormal_on_galore_side(r, rand):
    model, opt, cfg, tc = setup(r=r, rand_ratio=0.0 if rand else 2.0)
    ref = GPT(model.config).double()  # G computed independently, through a plain model with the same weights
    ref.load_state_dict(golore.export(model, cfg))
    x, y = batch(0)
    ref(x, y)[1].backward()
    events = update(model, opt, cfg, tc, 0)
    assert events["proj_random"] == float(rand) and 0 < events["proj_kept"] <= 1 + 1e-12
    if r == 8:  # the full basis of the smaller side keeps the whole gradient
        assert abs(events["proj_kept"] - 1) < 1e-10
    sides = {}
    for name, layer in layers(model).items():
        m, n = layer.weight.shape
        P = layer.proj
        sides[name.split(".")[-1]] = layer.right
        assert layer.right == (m >= n)  # GaLore's std rule: project the smaller side
        assert P.shape == ((r, n) if m >= n else (m, r))
        gram = P @ P.T if layer.right else P.T @ P  # (r, r)
        assert torch.allclose(gram, torch.eye(r, dtype=P.dtype), atol=1e-10)
        if not rand:  # P spans GaLore's subspace: the top-r singular vectors of G
            U, S, Vh = torch.linalg.svd(ref.get_submodule(name).weight.grad)
            Q = Vh[:r].T if layer.right else U[:, :r]
            Pc = P.T if layer.right else P
            assert torch.allclose(Pc @ Pc.T, Q @ Q.T, atol=1e-8)
    assert sides == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": True,
                     "gate_proj": True, "up_proj": True, "down_proj": False}


def test_galore_setting_is_galore_adamw_across_projector_changes():
    """--rand_ratio >= 1 == galore_torch's AdamW on a plain model: P from the SVD every `gap` steps, Adam on
    G·Pᵀ (Pᵀ·G) with m, v and the step count untouched when P changes, back-projected with the scale, and
    decoupled weight decay on the full W (torch's order: decay, then the update). Compared as W_eff."""
    s, lr, b1, b2, eps, r, wd, gap = 2.0, 1e-2, 0.9, 0.999, 1e-8, 4, 0.1, 2
    model, opt, cfg, tc = setup(r=r, gap=gap, rand_ratio=2.0, scale=s, lr=lr, weight_decay=wd)
    ref = tiny_gpt()
    adapted = layers(ref)
    other = [p for n, p in ref.named_parameters() if n.rsplit(".", 1)[0] not in adapted]
    ref_opt = train.default_optimizer(ref, tc)  # AdamW over the rest; adapted weights are stepped by hand
    for g in ref_opt.param_groups:
        g["params"] = [p for p in g["params"] if any(p is q for q in other)]
    state = {}
    for step in range(5):  # projections at 0, 2 and 4
        update(model, opt, cfg, tc, step)
        ref(*batch(step))[1].backward()
        with torch.no_grad():
            for name, lin in adapted.items():
                G = lin.weight.grad
                right = G.shape[0] >= G.shape[1]
                if step % gap == 0:  # a new P from this step's gradient; m and v stay as they are
                    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
                    state[name] = [Vh[:r] if right else U[:, :r]] + state.get(name, [None, 0.0, 0.0])[1:]
                P, m, v = state[name]
                Rg = G @ P.T if right else P.T @ G
                m, v = b1 * m + (1 - b1) * Rg, b2 * v + (1 - b2) * Rg * Rg
                t = step + 1
                # torch AdamW puts eps after the bias correction; R's gradient is -s·Rg, hence eps/s
                N = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps / s)
                lin.weight.mul_(1 - lr * wd)
                lin.weight -= lr * s * (N @ P if right else P @ N)
                lin.weight.grad = None
                state[name] = [P, m, v]
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        got = golore.export(model, cfg)
        for k, v in ref.state_dict().items():
            assert torch.allclose(got[k], v, atol=1e-10, rtol=0), (step, k)


def at_projection_event(rand_ratio=0.8, optimizer="adamw"):
    """Updates 0-2, then update 3 (a projection step with update_proj_gap 3) up to its backward."""
    model, opt, cfg, tc = setup(gap=3, rand_ratio=rand_ratio, optimizer=optimizer)
    for step in range(3):
        update(model, opt, cfg, tc, step)
    golore.step_start(3, model, cfg, tc)
    model(*batch(3))[1].backward()
    return model, opt, cfg, tc  # the caller runs golore.before_step(3, ...)


def test_projection_step_preserves_the_function_and_injects_the_gradient():
    model, opt, cfg, tc = at_projection_event()
    x, _ = batch(99)
    model.eval()
    with torch.no_grad():
        before = model(x)[0]
    old = {n: (l.weight.clone(), l.merged_weight(), l.proj.clone(), l.weight.grad.clone()) for n, l in layers(model).items()}
    golore.before_step(3, model, opt, cfg, tc)
    with torch.no_grad():
        after = model(x)[0]
    assert torch.allclose(before, after, atol=1e-12, rtol=0)
    for name, layer in layers(model).items():
        W, W_eff, P, G = old[name]
        assert not torch.allclose(W, W_eff) and not torch.allclose(layer.proj, P)  # a trained R, a new P ...
        assert torch.allclose(layer.weight, W_eff, atol=1e-12)  # ... after a merge
        assert torch.count_nonzero(layer.factor) == 0
        assert layer.weight.grad is None and not layer.weight.requires_grad
        Pn = layer.proj  # R.grad = -s·G·P_newᵀ (right) or -s·P_newᵀ·G (left)
        assert torch.allclose(layer.factor.grad, -cfg.scale * (G @ Pn.T if layer.right else Pn.T @ G), atol=1e-12)


@pytest.mark.parametrize("rand_ratio", [0.8, 2.0])  # GoLore (still in its SVD phase at step 3), GaLore
def test_first_moment_is_reprojected_in_golore_and_left_alone_in_galore(rand_ratio):
    model, opt, cfg, tc = at_projection_event(rand_ratio)
    assert not golore.use_random(3, cfg, tc)  # an SVD projection in both runs: the rule follows the run
    factors = {id(l.factor) for l in layers(model).values()}
    before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    P_old = {n: l.proj.clone() for n, l in layers(model).items()}
    golore.before_step(3, model, opt, cfg, tc)
    for name, layer in layers(model).items():
        st, old = opt.state[layer.factor], before[id(layer.factor)]
        Po, Pn = P_old[name], layer.proj
        assert torch.equal(st["exp_avg_sq"], old["exp_avg_sq"]) and torch.equal(st["step"], old["step"])
        if rand_ratio >= 1:  # galore_torch: the moments stay in the old coordinates
            assert torch.equal(st["exp_avg"], old["exp_avg"])
            continue
        expected = (old["exp_avg"] @ Po) @ Pn.T if layer.right else Pn.T @ (Po @ old["exp_avg"])
        assert torch.allclose(st["exp_avg"], expected, atol=1e-14)
        # the same statement lifted to m×n: the new moment is the old one's projection onto the new subspace
        lift_new = st["exp_avg"] @ Pn if layer.right else Pn @ st["exp_avg"]
        lift_old = old["exp_avg"] @ Po if layer.right else Po @ old["exp_avg"]
        proj_old = lift_old @ Pn.T @ Pn if layer.right else Pn @ Pn.T @ lift_old
        assert torch.allclose(lift_new, proj_old, atol=1e-14)
    for p, st in opt.state.items():  # every other parameter's state is untouched
        if id(p) not in factors:
            assert all(torch.equal(v, before[id(p)][k]) for k, v in st.items())


def test_switch_from_svd_to_random_at_rand_ratio():
    tc = train.TrainConfig(num_training_steps=10)
    cfg = golore.Config(rand_ratio=0.8)
    assert [golore.use_random(s, cfg, tc) for s in range(10)] == [False] * 8 + [True] * 2
    assert not any(golore.use_random(s, golore.Config(rand_ratio=1.0), tc) for s in range(10))  # GaLore

    def projectors(data_seed, rand_ratio):
        """P after the projections at steps 0 and 5 (gap 5, 10 steps), training on data `data_seed`."""
        model, opt, cfg, tc = setup(gap=5, rand_ratio=rand_ratio, steps=10)
        out, kinds = [], []
        for step in range(6):
            kinds.append(update(model, opt, cfg, tc, step, data_seed=data_seed + step))
            if step in (0, 5):
                out.append([l.proj.clone() for l in layers(model).values()])
        return out, kinds

    (a0, a5), kinds = projectors(0, 0.5)  # 5 / 10 >= 0.5: the second projection is random
    (b0, b5), _ = projectors(100, 0.5)
    assert [k.get("proj_random") for k in kinds] == [0.0, None, None, None, None, 1.0]
    assert not any(torch.allclose(p, q) for p, q in zip(a0, b0))  # SVD: depends on the gradient
    assert all(torch.equal(p, q) for p, q in zip(a5, b5))  # random: depends on (seed, step, layer) only
    assert not any(torch.allclose(p, q) for p, q in zip(a5[:4], a5[1:4]))  # q, k, v, o: one draw each
    (_, c5), _ = projectors(0, 0.51)  # just after the switch point: still SVD at step 5
    assert not any(torch.allclose(p, q) for p, q in zip(a5, c5))


def test_random_projector_is_haar_like():
    """QR with the sign fix: orthonormal, and E[PᵀP] = (r/n)·I, the property GoLore's analysis uses."""
    gen = torch.Generator().manual_seed(0)
    Ps = [golore.random_projector(6, 8, 2, True, gen, "cpu") for _ in range(4000)]  # right: (2, 8)
    mean = sum(P.T @ P for P in Ps) / len(Ps)
    assert torch.allclose(Ps[0] @ Ps[0].T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mean, torch.eye(8, dtype=torch.float64) * 2 / 8, atol=0.03)
    left = golore.random_projector(8, 6, 3, False, gen, "cpu")  # left: (8, 3)
    assert left.shape == (8, 3) and torch.allclose(left.T @ left, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_svd_failure_falls_back_to_float64(monkeypatch):
    G = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    expected = golore.svd_projector(G, 2, True)
    real, calls = torch.linalg.svd, []

    def flaky(A, **kw):
        calls.append(A.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real(A, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = golore.svd_projector(G, 2, True)
    assert calls == [torch.float32, torch.float64] and got.dtype == torch.float64
    assert torch.allclose(got.float().T @ got.float(), expected.T @ expected, atol=1e-5)


def test_impossible_settings_and_flag_aliases(train_run):
    for bad in (dict(r=9), dict(r=0), dict(update_proj_gap=0), dict(scale=0.0), dict(rand_ratio=-1.0),
                dict(adam8bit_embeddings=True)):  # 8-bit embeddings need --optimizer adam8bit
        with pytest.raises(ValueError):
            golore.wrap(tiny_gpt(), golore.Config(**bad))
    with pytest.raises(ValueError, match="exceeds min"):
        train_run("--method", "golore", "--rank", "200")
    with pytest.raises(ValueError, match="float16"):
        train_run("--method", "golore", "--dtype", "float16")
    for flag in ("--rank", "--lora_r", "--lora_rank", "--r"):
        assert train.parse_args(["--method", "golore", flag, "7"])[2].r == 7


def test_demo_galore_stalls_where_golore_converges():
    out = golore.projected_adam_demo(steps=1000)
    assert set(out) == {"galore", "golore", "galore_large_batch", "adam"}
    assert all(len(v) == 1000 and all(math.isfinite(x) for x in v) for v in out.values())
    assert out["galore"][0] > 10  # f - f*, from the same start
    # GaLore stalls in the noise subspace: from update 200 on it loses less than a fifth of its gap
    assert out["galore"][-1] > 0.8 * out["galore"][199] > 0.5
    assert out["golore"][-1] < 0.05 * out["galore"][-1]
    assert out["galore_large_batch"][-1] < 0.05 * out["galore"][-1]  # a large batch also fixes it (the paper)
    assert out["golore"][49] == out["galore"][49]  # the same first projection; then GoLore re-projects m


# ----------------------------------------------------------------------------- storage, fake tensors, export


@pytest.mark.parametrize("factor_dtype", ["storage", "float32"])
def test_bf16_storage_projection_keeps_the_function_to_bf16_tolerance(factor_dtype):
    """bf16 W and P, R in bf16 or float32; the merge is computed in float32 and rounded once into W."""
    model, opt, cfg, tc = setup(gap=3, lr=3e-2, dtype=torch.bfloat16, factor_dtype=factor_dtype)
    for layer in layers(model).values():
        assert layer.weight.dtype == layer.proj.dtype == torch.bfloat16
        assert layer.factor.dtype == (torch.float32 if factor_dtype == "float32" else torch.bfloat16)
    for step in range(3):
        update(model, opt, cfg, tc, step)
    golore.step_start(3, model, cfg, tc)
    model(*batch(3))[1].backward()
    x, _ = batch(99)
    model.eval()
    with torch.no_grad():
        before = model(x)[0].float()
    expected = {n: (l.weight.float() - cfg.scale * (l.factor.float() @ l.proj.float() if l.right else
                                                     l.proj.float() @ l.factor.float())).bfloat16()
                for n, l in layers(model).items()}
    shift = max((l.merged_weight() - l.weight.float()).abs().max().item() for l in layers(model).values())
    golore.before_step(3, model, opt, cfg, tc)
    with torch.no_grad():
        after = model(x)[0].float()
    # the merge moves W by a trained s·R·P (shift), and W_eff by at most half a bf16 ulp per entry: the
    # logits move by 0.4% of the largest one (bf16 rounds at 2^-9 relative), without the merge by 38%
    assert shift > 0.05
    assert (after - before).abs().max() < 0.02 * before.abs().max(), (after - before).abs().max()
    for name, layer in layers(model).items():
        assert torch.equal(layer.weight, expected[name]), name  # float32 merge, one rounding


def test_fake_tensors_memory_estimate_and_event_every_update(tmp_path):
    """memory.py runs build() and two updates on fake tensors with EVENT_EVERY_UPDATE: update 2 is an SVD
    projection; per-layer updates never hold all full gradients at once, so their peak is lower."""
    cfg = dataclasses.replace(golore.Config(), **golore.EVENT_EVERY_UPDATE)
    assert golore.is_projection_step(1, cfg) and not golore.use_random(1, cfg, train.TrainConfig())
    config = tmp_path / "one_block.json"  # a one-block model: fake tensors cost about a millisecond per op
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 64}))
    common = ["--method", "golore", "--model_config", str(config), "--max_length", "32", "--batch_size", "1",
              "--grad_clipping", "0"]
    plain = memory.estimate(common, vocab_size=257)
    per_layer = memory.estimate(common + ["--per_layer_updates"], vocab_size=257)
    assert plain["peak_update"] == 2 and plain["peak_phase"] == "before_step"  # the merges and SVDs
    assert per_layer["peak_bytes"] < plain["peak_bytes"]


def test_export_builds_one_layer_at_a_time_on_the_device_and_returns_cpu_tensors():
    """On fake CUDA tensors: every exported tensor is on the CPU, and the device never holds more than
    about one layer's merged weight beyond the model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    tc = train.TrainConfig(model_config="tiny")
    with FakeTensorMode(), memory.MemoryMeter("cuda", round_to=0) as meter:
        with torch.device("meta"):
            model = GPT(get_config("tiny", 257))
        model.plan(torch.device("cuda:0"))
        golore.wrap(model, golore.Config(), tc)
        model.materialize()
        meter.peak, held = 0, sum(meter.now.values())  # the model's bytes on the device
        sd = golore.export(model, golore.Config())
    assert set(sd) == set(GPT(get_config("tiny", 257)).state_dict())
    assert all(v.device.type == "cpu" for v in sd.values())
    largest = max(l.weight.numel() * 4 for l in golore.golore_layers(model))
    assert meter.peak - held <= 3 * largest, (meter.peak - held, largest)  # all 28 W_eff at once: 18x largest


# ----------------------------------------------------------------------------- through train.py

RUN = ["--method", "golore", "--rank", "8", "--update_proj_gap", "2", "--rand_ratio", "0.5"]


def rebuild(save_dir):
    """The wrapped model from ckpt.pt, in eval mode."""
    ck = torch.load(os.path.join(save_dir, "ckpt.pt"), weights_only=True)
    model = GPT(get_config("tiny", 257))
    golore.wrap(model, golore.Config(**ck["method_config"]))
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def test_resume_equals_unbroken_run_and_model_pt_is_the_wrapped_model(train_run, tmp_path):
    # 6 updates, gap 2: SVD projections at 0 and 2, a random one at 4 (4 / 6 >= 0.5); stop before 4
    full = train_run(*RUN, "--num_training_steps", "6", save_dir=tmp_path / "a")
    train_run(*RUN, "--num_training_steps", "6", "--stop_at_step", "4", save_dir=tmp_path / "b")
    train_run(*RUN, "--num_training_steps", "6", "--autoresume", save_dir=tmp_path / "b")
    events = [r["method/proj_random"] for r in full["metrics"] if "method/proj_random" in r]
    assert events == [0.0, 0.0, 1.0]
    (a, ck_a), (_, ck_b) = rebuild(tmp_path / "a"), rebuild(tmp_path / "b")
    for k, v in ck_a["model"].items():  # W, P and R: the projectors included
        assert torch.allclose(v, ck_b["model"][k], atol=1e-6, rtol=0), k
    for k, st in ck_a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.allclose(v, ck_b["optimizer"]["state"][k][name], atol=1e-6, rtol=0), (k, name)
    # model.pt is a plain GPT that computes what the wrapped model computes; export leaves the model alone
    plain = load_plain(tmp_path / "a" / "model.pt").eval()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    golore.export(a, golore.Config(**ck_a["method_config"]))
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], a(x)[0], atol=1e-5, rtol=0)


def test_bf16_storage_resume_is_exact(train_run, tmp_path):
    """--storage_dtype bfloat16: W, P, R and its AdamW state in bf16; stopped after the SVD
    projection at 2 and resumed through the random one at 4, the run ends bit for bit where an unbroken
    one does."""
    bf16 = RUN + ["--num_training_steps", "6", "--storage_dtype", "bfloat16", "--weight_decay", "0.1"]
    train_run(*bf16, save_dir=tmp_path / "a")
    train_run(*bf16, "--stop_at_step", "3", save_dir=tmp_path / "b")
    train_run(*bf16, "--autoresume", save_dir=tmp_path / "b")
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    dtypes = {k.rsplit(".", 1)[1]: v.dtype for k, v in ck_a["model"].items() if "self_attn.q_proj" in k}
    assert dtypes == {"weight": torch.bfloat16, "proj": torch.bfloat16, "factor": torch.bfloat16}
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k
    for k, st in ck_a["optimizer"]["state"].items():
        assert all(torch.equal(v, ck_b["optimizer"]["state"][k][name]) for name, v in st.items()), k


@pytest.mark.parametrize("w_first", [False, True])
def test_per_layer_updates_equal_the_ordinary_path(train_run, tmp_path, monkeypatch, w_first):
    """--per_layer_updates ends with the weights of the ordinary path, over SVD (0, 2) and random (4)
    projections, with weight decay, in either order of W's and R's gradient hooks (w_first: the forward
    computes the low-rank branch first, so W's gradient completes before R's). At most one layer's full
    gradient is alive at any hook."""
    if w_first:
        def forward(self, x):
            h = torch.nn.functional.linear(x, self.proj if self.right else self.factor.to(x.dtype))
            low = torch.nn.functional.linear(h, self.factor.to(h.dtype) if self.right else self.proj)
            return torch.nn.functional.linear(x, self.weight, self.bias) - self.scale * low
        monkeypatch.setattr(golore.GoLoreLinear, "forward", forward)
    real, seen = golore.param_step, {"order": [], "alive": 0}

    def spy(step, p, model, opt, cfg, tc):
        first = golore.golore_layers(model)[0]
        if step == 0 and (p is first.weight or p is first.factor):
            seen["order"].append("W" if p is first.weight else "R")
        alive = sum(l.weight.grad is not None or l.full_grad is not None for l in golore.golore_layers(model))
        seen["alive"] = max(seen["alive"], alive)
        return real(step, p, model, opt, cfg, tc)

    monkeypatch.setattr(golore, "param_step", spy)
    args = RUN + ["--num_training_steps", "6", "--grad_clipping", "0", "--weight_decay", "0.1"]
    train_run(*args, save_dir=tmp_path / "plain")
    out = train_run(*args, "--per_layer_updates", save_dir=tmp_path / "per_layer")
    assert seen["order"] == (["W", "R"] if w_first else ["R", "W"]) and seen["alive"] == 1
    assert [r["method/proj_random"] for r in out["metrics"] if "method/proj_random" in r] == [0.0, 0.0, 1.0]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("plain", "per_layer"))
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=1e-6, rtol=0), k


def test_two_ranks_agree_and_average_the_full_gradient(torchrun, train_run, tmp_path):
    """2-process gloo with an SVD projection (step 0) and a random one (step 2) inside the run.

    --check_ranks_every 1 makes train.py assert identical weights (P included) after every update;
    the ranks see different data, so a P from a rank's own G would differ. The result also matches one
    process that sees the same global batch through gradient accumulation: G is the average."""
    torchrun(*RUN, "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    train_run(*RUN, "--total_batch_size", "8", save_dir=tmp_path / "one")  # 2 micro-batches of 4
    records = [json.loads(l) for l in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["method/proj_random"] for r in records if "method/proj_random" in r] == [0.0, 1.0]
    ddp, one = rebuild(tmp_path / "ddp")[1]["model"], rebuild(tmp_path / "one")[1]["model"]
    for k, v in ddp.items():
        assert torch.allclose(v, one[k], atol=1e-4, rtol=0), k


@pytest.mark.slow
def test_two_ranks_agree_under_bf16_storage(torchrun, tmp_path):
    """The same 2-process run with bf16 W, P and R: the ranks still hold identical weights after every update."""
    torchrun(*RUN, "--storage_dtype", "bfloat16", "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    records = [json.loads(l) for l in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["method/proj_random"] for r in records if "method/proj_random" in r] == [0.0, 1.0]


# ----------------------------------------------------------------------------- --optimizer adam8bit

# the code's largest rounding error, relative to the block's absmax: half the widest gap between levels
# in [0, 1] (decade 0's linear steps: 0.9/64 for the signed code of m, 0.9/128 for the unsigned code of √v)
HALF_STEP = {kind: max([levels[0] if levels[0] > 0 else 0.0] + [(b - a) / 2 for a, b in zip(levels, levels[1:])])
             for kind, levels in ((k, [x for x in v if x >= 0]) for k, v in golore.LEVELS.items())}


def state_bytes(state):
    return sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if torch.is_tensor(v))


def test_adamw_is_train_pys_default_optimizer():
    """--optimizer adamw (the default): the optimizer train.py made before golore had make_optimizer, group for
    group, so runs and checkpoints are unchanged."""
    model, opt, cfg, tc = setup(weight_decay=0.1)
    ref = train.default_optimizer(model, tc)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == len(ref.param_groups) == 2
    for g, h in zip(opt.param_groups, ref.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in h["params"]]
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}


def test_8bit_code_rounds_to_the_nearest_level():
    """Blocks of 256, float32 absmax: every entry decodes to the level nearest to x / absmax (a brute-force
    argmin here), so its error is at most HALF_STEP·absmax; zero blocks and the absmax entry are exact."""
    assert HALF_STEP["dyn"] == pytest.approx(0.9 / 128) and HALF_STEP["dyn+"] == pytest.approx(0.9 / 256)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * torch.logspace(-6, 0, 1000)[torch.randperm(1000, generator=gen)]
    x[256:512] = 0  # a whole zero block; the last block is partial (1000 = 3·256 + 232)
    for kind, value in (("dyn", x), ("dyn+", x.abs())):
        codes, absmax = golore.quantize_blockwise(value, kind)
        assert codes.dtype == torch.uint8 and codes.numel() == 1024 and absmax.shape == (4,)
        got = golore.dequantize_blockwise(codes, absmax, kind, 1000)
        levels = torch.tensor(golore.LEVELS[kind])
        scale = torch.repeat_interleave(absmax, 256)[:1000]
        nearest = levels[(value / scale.clamp_min(1e-30))[:, None].sub(levels).abs().argmin(1)] * scale
        assert torch.allclose(got, nearest, rtol=1e-6, atol=0)
        assert ((got - value).abs() <= HALF_STEP[kind] * scale * (1 + 1e-6)).all()
        assert torch.equal(got[256:512], value[256:512])
        assert got.abs().max() == value.abs().max()


@pytest.mark.parametrize("lowest", [1.0, 1e-3])  # the smallest column's scale: entries far below their block's absmax
def test_adam8bit_update_is_adamws_within_the_codes_rounding(lowest):
    """The same gradients into AdamW8bit and into torch's AdamW (float64, weight decay 0.1). Update 1 agrees to
    float32 rounding: the zero state decodes exactly, and a step uses the float32 moments it computes before
    it rounds them. (The update is what follows the decay: u = (1 - lr·wd)·p_before - p_after.)
    Every later update agrees within a bound that follows from the code alone. With E, F bounds on the
    8-bit path's |m - M| and |√v - √V| (M, V torch's moments), the rounding recursions

        E_t = β1·(E_{t-1} + HALF_STEP_m·(‖M_{t-1}‖∞ + E_{t-1})),   F_t = √β2·(F_{t-1} + HALF_STEP_v·(‖√V_{t-1}‖∞ + F_{t-1}))

    (√(β2·a² + c) is √β2-Lipschitz in a) bound the update's error per entry by
    lr/(1-β1^t)·(E/d_low + |M|·F/√(1-β2^t)/(d_low·d)), d = √V̂ + ε and d_low = (√V - F)₊/√(1-β2^t) + ε.
    In norm, on entries of one scale: decade 0 of m's code rounds at 0.9/64 of the absmax (RMS 0.41% of it,
    about 1.2% of an entry's RMS for 256 Gaussians), which β1 carries over √(β1²/(1-β1²)) ≈ 2.1 steps' worth:
    about 2.5% of the update; a 5% bound. Entries spread over 1000x inside a block fall in the code's
    coarser decades (13% measured): only the per-entry bound is asserted there."""
    b1, b2, eps, lr, wd, shape = 0.9, 0.999, 1e-8, 1e-2, 0.1, (45, 61)  # 2745 entries: 11 blocks, the last partial
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen, dtype=torch.float64)
    p8, pr = (torch.nn.Parameter(start.clone()) for _ in range(2))
    o8 = golore.AdamW8bit([{"params": [p8], "bits": 8}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    oref = torch.optim.AdamW([pr], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    col = torch.logspace(math.log10(lowest), 0, shape[1], dtype=torch.float64)
    E = F = M_max = S_max = 0.0
    rel = []
    for t in range(1, 31):
        g = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5) * col
        before8, before_r = p8.detach().clone(), pr.detach().clone()
        p8.grad, pr.grad = g.clone(), g.clone()
        o8.step()
        oref.step()
        u8, ur = before8 * (1 - lr * wd) - p8.detach(), before_r * (1 - lr * wd) - pr.detach()  # decay, then the update
        if t > 1:
            E = b1 * (E + HALF_STEP["dyn"] * (M_max + E))
            F = math.sqrt(b2) * (F + HALF_STEP["dyn+"] * (S_max + F))
        M, S = oref.state[pr]["exp_avg"], oref.state[pr]["exp_avg_sq"].sqrt()
        M_max, S_max = M.abs().max().item(), S.max().item()
        rbc2 = math.sqrt(1 - b2 ** t)
        d, d_low = S / rbc2 + eps, (S - F).clamp_min(0) / rbc2 + eps
        bound = lr / (1 - b1 ** t) * (E / d_low + M.abs() * (F / rbc2) / (d_low * d))
        assert ((u8 - ur).abs() <= bound + 1e-6 * (ur.abs() + bound)).all(), t  # + float32 arithmetic
        rel.append(((u8 - ur).norm() / ur.norm()).item())
    assert rel[0] < 1e-6  # update 1: nothing rounded yet
    assert min(rel[1:]) > 1e-3  # later the rounding shows ...
    if lowest == 1.0:
        assert max(rel) < 0.05, rel  # ... at a few percent of the update
    st = o8.state[p8]
    assert {k: v.dtype for k, v in st.items() if torch.is_tensor(v)} == {
        "step": torch.float32, "m_codes": torch.uint8, "m_absmax": torch.float32,
        "v_codes": torch.uint8, "v_absmax": torch.float32}


def test_adam8bit_first_update_is_adamws_and_later_ones_stay_close():
    """Through the wrapped model, GoLore with weight decay: update 0 (a projection: R = 0 with the injected
    gradient) is torch's AdamW step to float32 rounding; over projections at 0, 3 and 6 (the first moment
    re-projected through its codes) W_eff stays within a few percent of the AdamW run's change."""
    runs = {}
    for optimizer in ("adamw", "adam8bit"):
        model, opt, cfg, tc = setup(gap=3, optimizer=optimizer, weight_decay=0.1)
        snapshot = lambda: {k: v.clone() for k, v in golore.export(model, cfg).items()}  # noqa: E731
        runs[optimizer] = [snapshot()]
        for step in range(8):
            update(model, opt, cfg, tc, step)
            runs[optimizer].append(snapshot())
    assert type(opt) is golore.AdamW8bit
    factors = [n for n, p in model.named_parameters() if n.endswith(".factor")]
    assert all(opt.param_groups[0]["params"][i] is model.get_parameter(n) for i, n in enumerate(factors))
    for k, v0 in runs["adamw"][0].items():
        d32, d8 = runs["adamw"][1][k] - v0, runs["adam8bit"][1][k] - v0
        # R's update in float32 (relative 6e-8), summed over r = 4 entries of P into each entry of W_eff
        assert torch.allclose(d8, d32, rtol=1e-6, atol=1e-6 * d32.abs().max().item()), k
    for k, v0 in runs["adamw"][0].items():  # after 8 updates: the change relative to AdamW's
        d32, d8 = runs["adamw"][-1][k] - v0, runs["adam8bit"][-1][k] - v0
        assert (d8 - d32).norm() <= 0.05 * d32.norm(), (k, ((d8 - d32).norm() / d32.norm()).item())


@pytest.mark.parametrize("rand_ratio", [0.8, 2.0])  # GoLore (its SVD phase), GaLore
def test_adam8bit_first_moment_at_a_projection(rand_ratio):
    """GoLore: the decoded first moment becomes the decoded old one times P_old·P_newᵀ (left: P_newᵀ·P_old),
    rounded once to the code; GaLore: every code stays. √v's codes and the step count are kept in both."""
    model, opt, cfg, tc = at_projection_event(rand_ratio, optimizer="adam8bit")
    before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
    P_old = {n: l.proj.clone() for n, l in layers(model).items()}
    golore.before_step(3, model, opt, cfg, tc)
    for name, layer in layers(model).items():
        st, old = opt.state[layer.factor], before[id(layer.factor)]
        assert st["m_codes"].dtype == torch.uint8
        for key in ("v_codes", "v_absmax", "step"):
            assert torch.equal(st[key], old[key]), key
        if rand_ratio >= 1:
            assert torch.equal(st["m_codes"], old["m_codes"]) and torch.equal(st["m_absmax"], old["m_absmax"])
            continue
        Po, Pn, shape = P_old[name].float(), layer.proj.float(), layer.factor.shape
        M = golore.dequantize_blockwise(old["m_codes"], old["m_absmax"], "dyn", old["numel"]).view(shape)
        want = (M @ (Po @ Pn.T) if layer.right else (Pn.T @ Po) @ M).reshape(-1)
        got = golore.dequantize_blockwise(st["m_codes"], st["m_absmax"], "dyn", st["numel"])
        pad = -want.numel() % 256
        absmax = torch.nn.functional.pad(want.abs(), (0, pad)).view(-1, 256).amax(1).repeat_interleave(256)[:want.numel()]
        assert not torch.equal(st["m_codes"], old["m_codes"])
        assert ((got - want).abs() <= HALF_STEP["dyn"] * absmax + 1e-6 * want.abs().max()).all(), name


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_adam8bit_state_bytes(train_run, tmp_path, storage):
    """The factors' two moments are uint8 codes plus one float32 absmax per 256 entries: a quarter of float32
    AdamW's 8 bytes per entry (x (1 + 4/256)), half of its bf16 state under bf16 storage; the embeddings, lm_head
    and norms keep torch's AdamW state (in their storage dtype), or 8-bit with --adam8bit_embeddings."""
    r, h, f, L, V = 8, 128, 352, 4, 257
    factors = [(h, r)] * 4 + [(f, r)] * 2 + [(r, f)]  # per block: q, k, v, o (right), gate, up (right), down (left)
    n_fac, emb, norms = L * sum(a * b for a, b in factors), 2 * V * h, (2 * L + 1) * h
    n_params = L * (7 + 2) + 3  # the step counters, 4 bytes each (float32, 0-dim)
    size = 4 if storage == "float32" else 2
    args = RUN + ["--num_training_steps", "2", "--storage_dtype", storage, "--eval_every", "100"]
    got = {o: train_run(*args, *o.split(), save_dir=tmp_path / o.replace(" ", ""))["summary"]["optimizer_state_bytes"]
           for o in ("--optimizer adamw", "--optimizer adam8bit", "--optimizer adam8bit --adam8bit_embeddings")}
    eight = lambda n: 2 * (-(-n // 256) * 256) + 2 * 4 * -(-n // 256)  # noqa: E731  two code arrays, two absmax
    assert got["--optimizer adamw"] == 2 * size * (n_fac + emb + norms) + 4 * n_params
    assert got["--optimizer adam8bit"] == L * sum(eight(a * b) for a, b in factors) + 2 * size * (emb + norms) + 4 * n_params
    assert got["--optimizer adam8bit --adam8bit_embeddings"] == (L * sum(eight(a * b) for a, b in factors) + 2 * eight(V * h)
                                                                + 2 * size * norms + 4 * n_params)
    fac8 = got["--optimizer adam8bit"] - 2 * size * (emb + norms) - 4 * n_params
    assert fac8 / (8 * n_fac) == pytest.approx(0.25 * (1 + 4 / 256))  # every factor here is a whole number of blocks


@pytest.mark.parametrize("storage,emb", [("float32", False), ("bfloat16", True)])
def test_adam8bit_resume_is_exact_and_keeps_the_codes(train_run, data_dir, tmp_path, storage, emb):
    """GoLore with SVD (0, 2) and random (4) projections re-projecting the 8-bit first moment, weight decay;
    stopped after 3 updates and resumed, the run ends bit for bit where an unbroken one does. Resuming
    through train.py's stages keeps every state tensor's dtype and bytes (the uint8 codes too)."""
    args = RUN + ["--num_training_steps", "6", "--optimizer", "adam8bit", "--weight_decay", "0.1", "--storage_dtype",
                  storage, "--eval_every", "100"] + (["--adam8bit_embeddings"] if emb else [])
    full = train_run(*args, save_dir=tmp_path / "a")
    train_run(*args, "--stop_at_step", "3", save_dir=tmp_path / "b")
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    tc, method, mc = train.parse_args(TINY + ["--data_dir", data_dir, "--save_dir", str(tmp_path / "b")] + args)
    run = train.setup(tc, method, mc)
    train.check_geometry(tc)
    train.build(run, 257)
    train.resume(run, str(tmp_path / "b" / "ckpt.pt"))
    dtypes = lambda state: sorted((k, str(v.dtype)) for st in state.values() for k, v in st.items() if torch.is_tensor(v))  # noqa: E731
    assert state_bytes(run.optimizer.state) == state_bytes(saved) > 0 and dtypes(run.optimizer.state) == dtypes(saved)
    n_codes = sum(v.dtype == torch.uint8 for st in saved.values() for v in st.values() if torch.is_tensor(v))
    assert n_codes == 2 * (4 * 7 + 2 * emb)  # m and √v codes of every factor (and the embeddings, lm_head)
    resumed = train_run(*args, "--autoresume", save_dir=tmp_path / "b")
    assert [r["method/proj_random"] for r in full["metrics"] if "method/proj_random" in r] == [0.0, 0.0, 1.0]
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k
    for k, st in ck_a["optimizer"]["state"].items():
        for name, v in st.items():
            other = ck_b["optimizer"]["state"][k][name]
            assert (torch.equal(v, other) and v.dtype == other.dtype) if torch.is_tensor(v) else v == other, (k, name)
    assert resumed["summary"]["train_loss"] == full["summary"]["train_loss"]


def test_adam8bit_per_layer_updates_equal_the_ordinary_path(train_run, tmp_path):
    """--per_layer_updates with adam8bit (and 8-bit embeddings) ends bit for bit with the weights and the
    8-bit state of the ordinary step, over SVD (0, 2) and random (4) projections, with weight decay."""
    args = RUN + ["--num_training_steps", "6", "--grad_clipping", "0", "--weight_decay", "0.1", "--optimizer", "adam8bit",
                  "--adam8bit_embeddings", "--eval_every", "100"]
    train_run(*args, save_dir=tmp_path / "plain")
    train_run(*args, "--per_layer_updates", save_dir=tmp_path / "per_layer")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("plain", "per_layer"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in st.items() if torch.is_tensor(v)), k


def test_adam8bit_on_fake_tensors(tmp_path):
    """memory.py's two updates (projections at both) with adam8bit, in both update modes and bf16 storage:
    the 8-bit step and the re-projection run on fake tensors, and the optimizer state shrinks."""
    config = tmp_path / "one_block.json"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 64}))
    common = ["--method", "golore", "--model_config", str(config), "--max_length", "32", "--batch_size", "1",
              "--grad_clipping", "0", "--rank", "16"]
    adamw = memory.estimate(common, vocab_size=257)
    est = {extra: memory.estimate(common + ["--optimizer", "adam8bit"] + list(extra), vocab_size=257)
           for extra in ((), ("--per_layer_updates",), ("--storage_dtype", "bfloat16"))}
    assert all(e["peak_update"] == 2 for e in est.values())
    assert est[()]["optimizer_bytes"] < adamw["optimizer_bytes"]
    assert est["--per_layer_updates", ]["peak_bytes"] < est[()]["peak_bytes"]
