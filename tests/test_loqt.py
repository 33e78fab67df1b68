"""LoQT: quantization, the quantized linear, the refresh, 8-bit Adam, resume, DDP and export."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loqt
from model import GPT, get_config, load_plain

# the NF4 table as printed in the QLoRA paper's appendix (bitsandbytes' create_normal_map)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def cfg(**kw):
    return loqt.Config(**{"lora_r": 4, "lora_alpha": 0.5, **kw})


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(get_config("tiny", 257))


def layer(m=24, n=16, seed=0, **kw):
    torch.manual_seed(seed)
    return loqt.LoQTLinear(nn.Linear(n, m, bias=False), cfg(**kw))


def set_random_adapter(lay, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(max(lay.P.shape), lay.r, generator=g))[0]  # orthonormal columns
    lay.P.load_(lay.P.encode(P.T if lay.left else P))
    with torch.no_grad():
        lay.B.copy_(0.05 * torch.randn(lay.B.shape, generator=g))


# ----------------------------------------------------------------------------- quantization


def test_nf4_code_matches_the_published_table():
    c = loqt.nf4_code()
    assert c.shape == (16,) and torch.all(c[1:] > c[:-1])
    assert c[0] == -1 and c[-1] == 1 and (c == 0).sum() == 1  # exact zero and both extremes
    torch.testing.assert_close(c, torch.tensor(NF4_PUBLISHED), atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind,shape", [("4bit", (64, 48)), ("4bit", (37, 29)), ("8bit", (37, 29))])
def test_blockwise_roundtrip_error_bound(kind, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]  # very different block scales
    q = loqt.QuantizedTensor(x, kind)
    err = (q.dequantize() - x).abs().flatten()
    c = loqt.code(kind, "cpu")
    absmax = loqt.quantize_blockwise(x, kind, 64)[1]
    bound = absmax.repeat_interleave(64)[:x.numel()] * (c[1:] - c[:-1]).max() / 2  # half the widest gap
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-12)
    # levels themselves come back exactly, and quantizing a dequantized tensor is a fixed point
    levels = c[torch.arange(64) % len(c)] * 3.0
    torch.testing.assert_close(loqt.QuantizedTensor(levels, kind).dequantize(), levels, atol=1e-6, rtol=0)
    torch.testing.assert_close(loqt.QuantizedTensor(q.dequantize(), kind).dequantize(), q.dequantize())


def test_pack_unpack():
    idx = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    packed = loqt.pack4(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert packed[0] == idx[0] * 16 + idx[1]  # first code in the high nibble
    assert torch.equal(loqt.unpack4(packed), idx)


def test_double_quant_roundtrip():
    torch.manual_seed(0)
    x = torch.randn(128, 300) * torch.rand(128, 1)  # 600 blocks: 3 second-level blocks of 256
    q = loqt.QuantizedTensor(x, "4bit", double_quant=True)
    assert {n for n, _ in q.named_buffers()} == {"codes", "absmax_codes", "absmax_scale", "absmax_offset"}
    absmax = loqt.quantize_blockwise(x, "4bit", 64)[1]
    enc = dict(q.named_buffers())
    absmax_dq = loqt.dequantize_blockwise(enc["absmax_codes"], enc["absmax_scale"], "dyn", absmax.numel()) + enc["absmax_offset"]
    dyn = loqt.code("dyn", "cpu")
    scale = enc["absmax_scale"].repeat_interleave(256)[:absmax.numel()]
    assert torch.all((absmax_dq - absmax).abs() <= scale * (dyn[1:] - dyn[:-1]).max() / 2 + 1e-7)
    # the weights: NF4 error on the slightly wrong scale, plus the scale's own error
    nf4 = loqt.code("4bit", "cpu")
    a, a_dq = absmax.repeat_interleave(64)[:x.numel()], absmax_dq.repeat_interleave(64)[:x.numel()]
    bound = a_dq * (nf4[1:] - nf4[:-1]).max() / 2 + (a - a_dq).abs()
    assert torch.all((q.dequantize() - x).abs().flatten() <= bound * (1 + 1e-5) + 1e-7)
    rel = (q.dequantize() - x).norm() / (loqt.QuantizedTensor(x, "4bit").dequantize() - x).norm()
    assert rel < 1.05  # double quantization costs (almost) nothing in accuracy


def test_bits_per_weight():
    w = torch.randn(352, 128)
    nbytes = lambda q: sum(t.numel() * t.element_size() for t in q.state_dict().values())  # noqa: E731
    assert nbytes(loqt.QuantizedTensor(w, "4bit")) * 8 / w.numel() == 4.5  # 4 bits + fp32 scale per 64
    assert nbytes(loqt.QuantizedTensor(w, "8bit")) * 8 / w.numel() == 8.5
    dq = nbytes(loqt.QuantizedTensor(w, "4bit", double_quant=True)) * 8 / w.numel()
    assert 4.12 < dq < 4.14  # 4 + 8/64 + 32·3/45056 (+ the offset)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("m,n", [(24, 16), (16, 24)])  # left and right side
def test_forward_and_input_grad_equal_float_reference(m, n):
    lay = layer(m, n)
    set_random_adapter(lay)
    assert lay.left == (n <= m) and lay.B.shape == ((m, 4) if n <= m else (4, n))
    x = torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)
    y = lay(x)
    W_ref = (lay.W.dequantize() + lay.s * lay.delta()).double().detach()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, W_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    assert [n for n, p in lay.named_parameters()] == ["B"]  # Q and P are buffers: nothing else can train


@pytest.mark.parametrize("m,n", [(24, 16), (16, 24)])
def test_weight_grad_on_refresh_step_equals_autograd(m, n):
    lay = layer(m, n)
    set_random_adapter(lay)
    lay.grad_W = torch.zeros(m, n)
    W_ref = lay.merged_weight().detach().double().requires_grad_()
    for micro in range(2):  # accumulated over micro-steps like train.py's grad_accum
        x = torch.randn(4, 7, n, dtype=torch.float64)  # an input that does not require grad still gives dL/dW
        target = torch.randn(4, 7, m, dtype=torch.float64)
        (F.mse_loss(lay(x), target) / 2).backward()
        (F.mse_loss(F.linear(x, W_ref), target) / 2).backward()
    torch.testing.assert_close(lay.grad_W.double(), W_ref.grad, atol=1e-5, rtol=1e-5)
    # B's gradient is the projected full gradient: s·G·Pᵀ (left) or s·Pᵀ·G (right)
    G, P = W_ref.grad.float(), lay.P.dequantize()
    torch.testing.assert_close(lay.B.grad, lay.s * (G @ P.T if lay.left else P.T @ G), atol=1e-5, rtol=1e-4)


def compensation_errors(lay, W_fp, Ks):
    out = []
    for K in Ks:
        out.append(loqt.compensated_init(lay, W_fp, K)[0])
    return out


@pytest.mark.parametrize("m,n", [(96, 64), (64, 96)])
def test_compensation_never_worse_and_falls(m, n):
    lay = layer(m, n, lora_r=16)
    set_random_adapter(lay)
    torch.manual_seed(3)
    W_fp = torch.randn(m, n) * 0.02
    errs = compensation_errors(lay, W_fp, range(6))
    plain = (loqt.QuantizedTensor(W_fp, "4bit").dequantize() - W_fp).norm().item()
    assert errs[0] == pytest.approx(plain, rel=1e-6)  # K = 0 is plain requantization, B = 0
    assert all(e <= errs[0] * (1 + 1e-6) for e in errs[1:])
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:]))  # more rounds, best-so-far never rises
    assert errs[5] < 0.97 * errs[0]
    # the kept state really has that error
    assert (W_fp - lay.merged_weight()).norm().item() == pytest.approx(errs[5], rel=1e-4)


@pytest.mark.parametrize("quantize_w,K", [("4bit", 0), ("4bit", 3), ("8bit", 2), ("none", 0)])
def test_refresh_changes_function_by_at_most_quantization_error(quantize_w, K):
    model = tiny_gpt()
    c = loqt.Config(lora_r=8, compensate_quant_error_iterations=K, quantize_w=quantize_w)
    loqt.wrap(model, c)
    for i, lay in enumerate(loqt.loqt_layers(model)):
        set_random_adapter(lay, seed=i)
    x = torch.randint(0, 257, (2, 16))
    opt = loqt.make_optimizer(model, c, train_cfg())
    fp = {k: v.clone() for k, v in loqt.export(model, c).items()}  # W_fp = deq(Q) + s·ΔW, float32
    loqt.step_start(0, model, c, train_cfg())
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    model.eval()
    with torch.no_grad():
        before_logits = model(x)[0]
        before = {id(l): l.merged_weight() for l in loqt.loqt_layers(model)}
        ids = [id(p) for p in model.parameters()]
        out = loqt.after_step(0, model, opt, c, train_cfg())
        after_logits = model(x)[0]
    assert out["refresh"] == 1 and [id(p) for p in model.parameters()] == ids  # parameters kept alive
    for lay in loqt.loqt_layers(model):
        assert lay.grad_W is None
        W_fp, W_new = before[id(lay)], lay.merged_weight()
        bound = (loqt.QuantizedTensor(W_fp, quantize_w).dequantize() - W_fp).norm()
        assert (W_new - W_fp).norm() <= bound * (1 + 1e-5) + 1e-6
        P = lay.P.dequantize()
        assert torch.linalg.matrix_rank(P).item() == lay.r  # a real new projector, not the old random one
    if quantize_w == "none":
        torch.testing.assert_close(after_logits, before_logits, atol=1e-5, rtol=1e-5)
    else:  # no further than plainly requantizing every merged weight moves the logits
        requant = tiny_gpt()
        requant.load_state_dict({k: loqt.QuantizedTensor(v, quantize_w).dequantize() if "_proj" in k else v
                                 for k, v in fp.items()})
        with torch.no_grad():
            bound = (requant.eval()(x)[0] - before_logits).norm()
        assert (after_logits - before_logits).norm() <= 1.2 * bound
        if K == 0:  # K = 0 is exactly that requantization
            torch.testing.assert_close(after_logits, requant(x)[0], atol=1e-5, rtol=1e-5)


def test_sub_quantum_update_vanishes_unless_compensated():
    """USER_NEEDS §2.5: requantization drops an update smaller than a quantization step; the
    error-compensated init keeps it in B when it lies in the new subspace."""
    lost = {}
    for K in (0, 3):
        lay = layer(64, 48, lora_r=4)
        set_random_adapter(lay)
        with torch.no_grad():
            lay.B.mul_(1e-4)  # s·ΔW far below half a quantization step
        W_q, dW = lay.W.dequantize().clone(), lay.s * lay.delta()
        lay.grad_W = torch.randn(64, 4) @ lay.P.dequantize()  # G whose top singular space is P's own
        loqt.after_step(0, nn.Sequential(lay), torch.optim.AdamW([lay.B]), cfg(compensate_quant_error_iterations=K),
                        train_cfg())
        lost[K] = (lay.merged_weight() - (W_q + dW)).norm().item()
        if K == 0:  # Q did not move, B is zero: the update is gone
            torch.testing.assert_close(lay.W.dequantize(), W_q, atol=1e-5, rtol=1e-4)  # (block scales shift a hair)
            assert lost[0] > 0.8 * dW.norm().item()
    assert lost[3] < 0.5 * lost[0]


def train_cfg(**kw):
    import train
    return train.TrainConfig(**{"num_training_steps": 100, "lr": 1e-3, **kw})


def test_refresh_projector_is_top_singular_space_of_gradient():
    lay = layer(24, 16, quantize_projection_matrix="none")
    G = torch.randn(24, 16)
    lay.grad_W = G.clone()
    model = nn.Sequential(lay)
    loqt.after_step(0, model, torch.optim.AdamW([lay.B]), cfg(quantize_projection_matrix="none"), train_cfg())
    Vh = torch.linalg.svd(G)[2][:4]
    torch.testing.assert_close(lay.P.dequantize() @ lay.P.dequantize().T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close((lay.P.dequantize().T @ lay.P.dequantize()), Vh.T @ Vh, atol=1e-5, rtol=0)


def test_refresh_step_lists():
    c = loqt.Config(update_proj_gap=100, increment_size=1.2, proj_gap_progression="exponential")
    assert loqt.refresh_steps(c, 1100) == [0, 100, 201, 302, 403, 505, 607, 709, 812, 916, 1021]  # METHODS.md §7.2
    last_gaps = [b - a for a, b in zip(loqt.refresh_steps(c, 60_000), loqt.refresh_steps(c, 60_000)[1:])][-5:]
    assert last_gaps == [4488, 5366, 6419, 7683, 9200]
    assert loqt.refresh_steps(loqt.Config(update_proj_gap=50, proj_gap_progression="static"), 200) == [0, 50, 100, 150, 200]
    lin = loqt.refresh_steps(loqt.Config(update_proj_gap=10, increment_size=2.5, proj_gap_progression="linear"), 80)
    assert lin == [0, 10, 22, 37, 54, 74]  # gaps ⌊10 + k·2.5⌋ = 12, 15, 17, 20
    capped = loqt.refresh_steps(loqt.Config(update_proj_gap=100, max_proj_gap=150), 100_000)
    assert max(b - a for a, b in zip(capped, capped[1:])) == 150


def test_wrap_identity_at_init_and_trainable_count():
    base = tiny_gpt()
    x = torch.randint(0, 257, (2, 16))
    for quantize_w in ("none", "4bit"):
        model = tiny_gpt()
        loqt.wrap(model, loqt.Config(quantize_w=quantize_w))
        # the wrapped model is the base model with its weights replaced by deq(Q) (exactly W for "none")
        ref = tiny_gpt()
        ref.load_state_dict(loqt.export(model, None))
        torch.testing.assert_close(model(x)[0], ref(x)[0], atol=1e-6, rtol=1e-6)
        if quantize_w == "none":
            torch.testing.assert_close(model(x)[0], base(x)[0], atol=1e-6, rtol=1e-6)
    r, h, f, L, V = 32, 128, 352, 4, 257
    expected = L * (4 * r * h + 3 * r * f) + 2 * V * h + (2 * L + 1) * h  # factors r·max(m, n), embeddings, norms
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_impossible_settings_fail_at_wrap():
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        loqt.wrap(tiny_gpt(), loqt.Config(lora_r=129))
    with pytest.raises(ValueError):
        loqt.wrap(tiny_gpt(), loqt.Config(compensate_quant_error_iterations=-1))


# ----------------------------------------------------------------------------- 8-bit Adam


def test_adam8bit_tracks_float32_adam_on_regression():
    torch.manual_seed(0)
    X, W_true = torch.randn(256, 128), torch.randn(128, 64) / 10
    Y = X @ W_true

    def run(make):
        W = nn.Parameter(torch.zeros(128, 64))  # 8192 elements: 8-bit state
        b = nn.Parameter(torch.zeros(64))  # small: float32 state
        o = make([W, b])
        losses = []
        for _ in range(150):
            loss = F.mse_loss(X @ W + b, Y)
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss.item())
        return W.detach(), losses, o

    W32, l32, _ = run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    W8, l8, o8 = run(lambda p: loqt.Adam8bit(p, lr=1e-2))
    assert l8[-1] < 0.02 * l8[0] and l8[-1] < 2 * l32[-1] + 1e-4
    assert (W8 - W32).norm() / W32.norm() < 0.05
    st = list(o8.state.values())
    assert st[0]["m_codes"].dtype == torch.uint8 and "exp_avg" in st[1]
    # state bytes of the 8-bit tensor: about a quarter of float32 Adam's two moments
    b8 = sum(v.numel() * v.element_size() for k, v in st[0].items() if torch.is_tensor(v) and k != "step")
    assert b8 / (2 * 4 * 8192) == pytest.approx(0.25 * (1 + 4 / 256), rel=1e-6)


def test_summary_bytes_nf4_and_adam8bit(train_run, tmp_path):
    common = ["--method", "loqt", "--num_training_steps", "2", "--update_proj_gap", "1"]
    a = train_run(*common, "--dtype", "bfloat16", save_dir=tmp_path / "a")["summary"]  # autocast path too
    assert a["val_loss"] < 6.0
    b = train_run(*common, "--optimizer", "adam8bit", "--use_double_quant", save_dir=tmp_path / "b")["summary"]
    r, h, f, L, V = 32, 128, 352, 4, 257
    adapted = L * (4 * h * h + 3 * h * f)
    factors, P = L * (4 * r * h + 3 * r * f), L * 7 * r * h  # B: r·max(m, n); P: r·min(m, n)
    others = 2 * V * h + (2 * L + 1) * h
    assert a["param_bytes"] == adapted * 4.5 / 8 + P * 4.5 / 8 + 4 * (factors + others)  # NF4 W and P, fp32 rest
    assert a["param_bytes"] < 0.5 * 4 * a["total_params"]  # under half of the float32 model
    assert b["param_bytes"] < a["param_bytes"]  # double quantization
    # adam8bit: factors' moments at ~1/4 of float32; embeddings, lm_head and norms keep float32
    state32 = 8 * (factors + others)
    assert a["optimizer_state_bytes"] - state32 <= 4 * 64
    expect8 = 2 * factors * (1 + 4 / 256) + 8 * others
    assert abs(b["optimizer_state_bytes"] - expect8) <= 4 * 64 + 8 * 64


# ----------------------------------------------------------------------------- optimizer state at a refresh


@pytest.mark.parametrize("optimizer", ["adamw", "adam8bit"])
@pytest.mark.parametrize("how", ["keep", "reset", "project"])
def test_refresh_optimizer_state(how, optimizer):
    model = tiny_gpt()
    c = loqt.Config(optimizer=optimizer, refresh_optimizer_state=how, lora_r=32, compensate_quant_error_iterations=1)
    loqt.wrap(model, c)
    tc = train_cfg()
    opt = loqt.make_optimizer(model, c, tc)
    x = torch.randint(0, 257, (2, 17))
    for step in range(2):  # step 0 sets a first projector, step 1 builds moments, then a refresh
        loqt.step_start(0, model, c, tc)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
        before = {p: [loqt.get_moments(opt.state[p])[i].clone() for i in range(2)] for p in model.parameters()}
        P_old = {lay: lay.P.dequantize() for lay in loqt.loqt_layers(model)}
        loqt.after_step(0, model, opt, c, tc)
    for p, (m, v) in before.items():
        m2, v2 = loqt.get_moments(opt.state[p])
        lay = next((l for l in loqt.loqt_layers(model) if l.B is p), None)
        if lay is None or how == "keep":  # untouched: exactly the same bytes
            assert torch.equal(m2, m) and torch.equal(v2, v)
        elif how == "reset":
            assert not m2.any() and not v2.any() and opt.state[p]["step"] == 0
        else:
            P_new = lay.P.dequantize()
            C = P_old[lay] @ P_new.T if lay.left else P_new.T @ P_old[lay]
            m, m2 = m.view(p.shape), m2.view(p.shape)
            want = m @ C if lay.left else C @ m
            tol = 1e-6 if optimizer == "adamw" else 0.08 * want.abs().max().item()
            torch.testing.assert_close(m2, want, atol=tol, rtol=0 if optimizer == "adam8bit" else 1e-5)


# ----------------------------------------------------------------------------- runs: resume, export, DDP


def test_resume_exact_and_model_pt_equals_wrapped(train_run, tmp_path):
    args = ["--method", "loqt", "--update_proj_gap", "2", "--proj_gap_progression", "static", "--optimizer", "adam8bit",
            "--lora_r", "8", "--compensate_quant_error_iterations", "2", "--use_double_quant", "--eval_every", "100"]
    full = train_run(*args, save_dir=tmp_path / "full")
    train_run(*args, "--stop_at_step", "2", save_dir=tmp_path / "cut")  # refreshes at 0 before, 2 after the cut
    resumed = train_run(*args, "--autoresume", save_dir=tmp_path / "cut")
    assert [r["step"] for r in full["metrics"] if "method/refresh" in r] == [1, 3]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and any(k.endswith("W.codes") for k in a["model"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k].double(), b["model"][k].double(), atol=1e-6, rtol=0), k
    assert resumed["summary"]["train_loss"] == pytest.approx(full["summary"]["train_loss"], abs=1e-6)
    # model.pt (dequantized, merged, plain GPT) gives the wrapped model's logits
    wrapped = tiny_gpt()
    c = loqt.Config(lora_r=8, use_double_quant=True)
    loqt.wrap(wrapped, c)
    wrapped.load_state_dict(a["model"])
    plain = load_plain(os.path.join(tmp_path, "full", "model.pt"))
    assert plain.config.n_layer == wrapped.config.n_layer
    wrapped.eval(), plain.eval()
    x = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], wrapped(x)[0], atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in tiny_gpt().parameters())


def test_ddp_ranks_agree(torchrun, tmp_path):
    proc = torchrun("--method", "loqt", "--update_proj_gap", "1", "--proj_gap_progression", "static",
                    "--optimizer", "adam8bit", "--compensate_quant_error_iterations", "2",
                    "--refresh_optimizer_state", "project", "--check_ranks_every", "1", "--lora_r", "8",
                    save_dir=tmp_path / "ddp")
    assert "done:" in proc.stdout


def test_ddp_equals_single_process_gradient_accumulation(torchrun, train_run, tmp_path):
    """The all-reduced ∂L/∂W: 2 ranks × 4 sequences == 1 process × 2 micro-batches of 4 (same global batch).

    Unquantized W and P so that no rounding boundary amplifies float-summation-order noise."""
    args = ["--method", "loqt", "--total_batch_size", "8", "--update_proj_gap", "2", "--proj_gap_progression", "static",
            "--quantize_w", "none", "--quantize_projection_matrix", "none", "--lora_r", "8", "--eval_every", "100"]
    torchrun(*args, save_dir=tmp_path / "ddp")
    train_run(*args, save_dir=tmp_path / "one")
    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
