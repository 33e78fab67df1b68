"""LoQT: quantization, the quantized linear, the refresh, 8-bit Adam, resume, DDP, memory modes and export."""

import functools
import json
import os
import time
import types
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loqt
import train
from conftest import TINY
from model import GPT, get_config, load_plain

# the NF4 table as printed in the QLoRA paper's appendix (bitsandbytes' create_normal_map)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def cfg(**kw):
    return loqt.Config(**{"lora_r": 4, "lora_alpha": 0.5, **kw})


def train_cfg(**kw):
    return train.TrainConfig(**{"num_training_steps": 100, "lr": 1e-3, **kw})


def tiny_gpt(seed=0):
    return GPT(get_config("tiny", 257), seed=seed)


def layer(m=24, n=16, seed=0, **kw):
    torch.manual_seed(seed)
    return loqt.LoQTLinear(nn.Linear(n, m, bias=False), cfg(**kw))


def set_random_adapter(lay, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(max(lay.P.shape), lay.r, generator=g))[0]  # orthonormal columns
    lay.P.load_(lay.P.encode(P.T if lay.left else P))
    with torch.no_grad():
        lay.B.copy_(0.05 * torch.randn(lay.B.shape, generator=g))


def state_bytes(state):
    """Bytes of an optimizer state ({param: {key: value}}), as train.py's summary counts them."""
    return sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if torch.is_tensor(v))


def ckpt_model(save_dir):
    return torch.load(os.path.join(save_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


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


def test_pack_and_pair_lookup():
    idx = torch.randint(0, 16, (1024,), dtype=torch.uint8)
    packed = loqt.pack4(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == 512
    assert packed[0] == idx[0] * 16 + idx[1]  # first code in the high nibble
    absmax = torch.rand(16) + 0.5  # blocks of 64
    want = loqt.code("4bit", "cpu")[idx.long()] * absmax.repeat_interleave(64)
    torch.testing.assert_close(loqt.dequantize_blockwise(packed, absmax, "4bit", 1000), want[:1000], atol=0, rtol=0)


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
    lay.collect_G = torch.device("cpu")  # what step_start does on a refresh step
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


def test_B_gradient_hook_sees_the_projection_made():
    """The hook --per_layer_updates relies on: on a refresh step (step_start: one backward per micro-step
    expected) the layer's backward has projected its complete G, and freed it, by the time B's gradient
    lands; over two micro-steps, only after the second. Driven by hand (no step_start) the layer just
    keeps G for after_step."""
    lay = layer(24, 16)
    set_random_adapter(lay)
    loqt.step_start(0, nn.Sequential(lay), cfg(), train_cfg(grad_accum=2))
    seen = []
    lay.B.register_post_accumulate_grad_hook(lambda p: seen.append((lay.pending is not None, lay.grad_W is not None or
                                                                    len(lay.G_parts) > 0)))
    x = torch.randn(2, 5, 16)
    for micro in range(2):
        lay(x[micro]).pow(2).sum().backward()
    assert seen == [(False, True), (True, False)]
    with pytest.raises(RuntimeError, match="once per forward"):  # a third backward: G was projected too early
        lay(x[0]).pow(2).sum().backward()
    by_hand = layer(24, 16)
    set_random_adapter(by_hand)
    by_hand.collect_G = torch.device("cpu")
    by_hand(x[0]).pow(2).sum().backward()
    assert by_hand.pending is None and by_hand.grad_W is not None


def per_round_errors(W_fp, P, s, left, K):
    """The compensation rounds written out independently: e_k = ‖W_fp − deq(Q_k) − s·ΔW_k‖_F, k = 1..K."""
    P_pinv, C, errs = torch.linalg.pinv(P), W_fp, []
    for _ in range(K):
        R = W_fp - loqt.QuantizedTensor(C, "4bit").dequantize()
        B = R @ P_pinv / s if left else P_pinv @ R / s
        dW = s * (B @ P if left else P @ B)
        errs.append((R - dW).norm().item())
        C = W_fp - dW
    return errs


@pytest.mark.parametrize("m,n", [(96, 64), (64, 96)])
def test_compensation_keeps_the_argmin_round_and_beats_plain_requantization(m, n):
    # a weight-like matrix (noise, a low-rank part, 1% outliers) and P from a gradient-like matrix
    g = torch.Generator().manual_seed(7)
    W_fp = 0.02 * torch.randn(m, n, generator=g) + 0.01 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
    W_fp += 0.05 * (torch.rand(m, n, generator=g) < 0.01) * torch.randn(m, n, generator=g)
    G = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) + 0.3 * torch.randn(m, n, generator=g)
    lay = layer(m, n, lora_r=16)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    lay.P.load_(lay.P.encode(Vh[:16] if lay.left else U[:, :16]))
    K = 10
    errs = per_round_errors(W_fp, lay.P.dequantize(), lay.s, lay.left, K)
    best = min(range(K), key=errs.__getitem__)
    assert 0 < best < K - 1  # neither the first nor the last round: keeping either one would fail below
    kept, plain = loqt.compensated_init(lay, W_fp, K)
    assert plain.item() == pytest.approx((loqt.QuantizedTensor(W_fp, "4bit").dequantize() - W_fp).norm().item(), rel=1e-6)
    assert kept.item() == pytest.approx(errs[best], rel=1e-5)
    assert (W_fp - lay.merged_weight()).norm().item() == pytest.approx(errs[best], rel=1e-4)  # the state is that round
    assert kept < 0.8 * plain


def logits(model, x):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype == torch.bfloat16):
        out = model(x)[0].float()
    model.train()
    return out


@pytest.mark.parametrize("quantize_w,K,storage", [("4bit", 0, "float32"), ("4bit", 3, "float32"), ("8bit", 2, "float32"),
                                                  ("none", 0, "float32"), ("4bit", 3, "bfloat16"), ("none", 0, "bfloat16")])
def test_refresh_changes_function_by_at_most_quantization_error(quantize_w, K, storage):
    """float32: the logits move no further than plainly requantizing every merged weight (x1.2), and
    not at all without quantization (1e-5). bfloat16 storage: the same bound plus bf16 rounding of
    the logits (2^-7 relative, what an unquantized bf16 refresh costs)."""
    storage = getattr(torch, storage)
    model = tiny_gpt().to(storage)
    c = loqt.Config(lora_r=8, compensate_quant_error_iterations=K, quantize_w=quantize_w)
    loqt.wrap(model, c)
    for i, lay in enumerate(loqt.loqt_layers(model)):
        set_random_adapter(lay, seed=i)
    assert all(lay.B.dtype == storage for lay in loqt.loqt_layers(model))  # B follows the storage dtype
    x = torch.randint(0, 257, (2, 16))
    tc = train_cfg(dtype="bfloat16" if storage == torch.bfloat16 else "float32")
    opt = loqt.make_optimizer(model, c, tc)
    fp = {k: v.float().clone() for k, v in loqt.export(model, c).items()}  # W_fp = deq(Q) + s·ΔW
    loqt.step_start(0, model, c, tc)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=storage == torch.bfloat16):
        _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    before_logits = logits(model, x)
    before = {id(lay): lay.merged_weight() for lay in loqt.loqt_layers(model)}
    ids = [id(p) for p in model.parameters()]
    out = loqt.after_step(0, model, opt, c, tc)
    after_logits = logits(model, x)
    assert out["refresh"] == 1 and [id(p) for p in model.parameters()] == ids  # parameters kept alive
    bf16 = 2 ** -7 if storage == torch.bfloat16 else 0
    for lay in loqt.loqt_layers(model):
        assert lay.grad_W is None and lay.collect_G is None
        W_fp, W_new = before[id(lay)], lay.merged_weight()
        bound = (loqt.QuantizedTensor(W_fp, quantize_w).dequantize() - W_fp).norm() + bf16 * W_fp.norm()
        assert (W_new - W_fp).norm() <= bound * (1 + 1e-5) + 1e-6
        assert torch.linalg.matrix_rank(lay.P.dequantize()).item() == lay.r  # a real new projector, not P = 0
    requant = tiny_gpt().to(storage)
    requant.load_state_dict({k: loqt.QuantizedTensor(v, quantize_w).dequantize() if "_proj" in k else v
                             for k, v in fp.items()})
    bound = (logits(requant, x) - before_logits).norm() + bf16 * before_logits.norm()
    if quantize_w == "none" and storage == torch.float32:
        torch.testing.assert_close(after_logits, before_logits, atol=1e-5, rtol=1e-5)
    else:  # no further than plainly requantizing every merged weight moves the logits
        assert (after_logits - before_logits).norm() <= 1.2 * bound
    if K == 0 and storage == torch.float32:  # K = 0 is exactly that requantization
        torch.testing.assert_close(after_logits, logits(requant, x), atol=1e-5, rtol=1e-5)


def test_sub_quantum_update_vanishes_unless_compensated():
    """Requantization drops an update smaller than a quantization step (why the paper grows the gaps,
    §3.3); the error-compensated init keeps it in B when it lies in the new subspace."""
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


@pytest.mark.parametrize("m,n", [(24, 16), (16, 24)])  # left (P: top-r right vectors as rows), right (top-r left, columns)
def test_refresh_projector_is_top_singular_space_of_gradient(m, n):
    lay = layer(m, n, quantize_projection_matrix="none")
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
    V0 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    G = U0[:, :16] @ torch.diag(torch.linspace(8, 1, 16)) @ V0[:, :16].T  # distinct singular values 8 > ... > 1
    lay.grad_W = G.clone()
    loqt.after_step(0, nn.Sequential(lay), torch.optim.AdamW([lay.B]), cfg(quantize_projection_matrix="none"), train_cfg())
    P = lay.P.dequantize()
    top = V0[:, :4] if lay.left else U0[:, :4]  # the top-4 singular vectors on P's side
    assert P.shape == ((4, n) if lay.left else (m, 4))
    basis = P.T if lay.left else P
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ basis.T, top @ top.T, atol=1e-5, rtol=0)  # the same subspace


# ----------------------------------------------------------------------------- the schedule


def original_schedule(tau, progression, psi, T):
    """The original's get_proj_update_steps, written out (gaps of the linear progression summed in floats)."""
    steps, t, gap, k = [0], tau, tau, 0
    while t <= T:
        steps.append(t)
        k += 1
        if progression == "linear":
            gap += psi
            t += int(gap)
        else:
            t += tau if progression == "static" else tau + int(psi ** k)
    return steps


def test_refresh_step_lists():
    c = loqt.Config(update_proj_gap=100, increment_size=1.2, proj_gap_progression="exponential")
    assert loqt.refresh_steps(c, 1100) == [0, 100, 201, 302, 403, 505, 607, 709, 812, 916, 1021]  # paper Fig. / repo
    last_gaps = [b - a for a, b in zip(loqt.refresh_steps(c, 60_000), loqt.refresh_steps(c, 60_000)[1:])][-5:]
    assert last_gaps == [4488, 5366, 6419, 7683, 9200]
    assert loqt.refresh_steps(loqt.Config(update_proj_gap=50, proj_gap_progression="static"), 200) == [0, 50, 100, 150, 200]
    lin = loqt.refresh_steps(loqt.Config(update_proj_gap=10, increment_size=2.5, proj_gap_progression="linear"), 80)
    assert lin == [0, 10, 22, 37, 54, 74]  # gaps ⌊10 + k·2.5⌋ = 12, 15, 17, 20
    capped = loqt.refresh_steps(loqt.Config(update_proj_gap=100, max_proj_gap=150), 100_000)
    assert max(b - a for a, b in zip(capped, capped[1:])) == 150
    for prog in ("static", "linear", "exponential"):
        assert loqt.refresh_steps(loqt.Config(update_proj_gap=100, proj_gap_progression=prog), 100_000) == \
            original_schedule(100, prog, 1.2, 100_000), prog


def test_linear_progression_sums_gaps_in_floating_point_as_the_original():
    ours = loqt.refresh_steps(loqt.Config(update_proj_gap=100, increment_size=1.2, proj_gap_progression="linear"), 200_000)
    assert ours == original_schedule(100, "linear", 1.2, 200_000)
    closed = [0, 100]  # ⌊τ + k·ψ⌋ in closed form parts from the float sum from k ≈ 36 on
    for k in range(1, len(ours) - 1):
        closed.append(closed[-1] + int(100 + k * 1.2))
    assert closed != ours


def test_long_static_schedule_does_not_overflow_and_is_computed_once():
    c = loqt.Config(update_proj_gap=1, proj_gap_progression="static")  # ψ^k with k = 4000 overflows a float
    assert loqt.refresh_steps(c, 4000) == list(range(4001))
    empty, tc = nn.Sequential(), train_cfg(num_training_steps=20_000)
    t0 = time.perf_counter()
    for step in range(20_000):  # a list of 20k steps rebuilt at every step would take minutes
        loqt.step_start(step, empty, c, tc)
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- wrap, export, settings


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


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_export_is_a_plain_cpu_state_dict_in_the_storage_dtype(storage):
    storage = getattr(torch, storage)
    model = tiny_gpt().to(storage)
    loqt.wrap(model, loqt.Config(lora_r=8))
    for i, lay in enumerate(loqt.loqt_layers(model)):
        set_random_adapter(lay, seed=i)
    sd = loqt.export(model, None)
    assert sd.keys() == tiny_gpt().state_dict().keys()
    assert all(v.device.type == "cpu" and v.dtype == storage for v in sd.values())
    for name, mod in model.named_modules():
        if isinstance(mod, loqt.LoQTLinear):
            torch.testing.assert_close(sd[name + ".weight"], mod.merged_weight().to(storage))


def test_impossible_settings_fail_at_wrap():
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        loqt.wrap(tiny_gpt(), loqt.Config(lora_r=129))
    with pytest.raises(ValueError):
        loqt.wrap(tiny_gpt(), loqt.Config(compensate_quant_error_iterations=-1))
    with pytest.raises(ValueError, match="needs --optimizer adam8bit"):
        loqt.wrap(tiny_gpt(), loqt.Config(adam8bit_embeddings=True))


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
    emb, norms = 2 * V * h, (2 * L + 1) * h
    assert a["param_bytes"] == adapted * 4.5 / 8 + P * 4.5 / 8 + 4 * (factors + emb + norms)  # NF4 W and P, fp32 rest
    assert a["param_bytes"] < 0.5 * 4 * a["total_params"]  # under half of the float32 model
    assert b["param_bytes"] < a["param_bytes"]  # double quantization
    # adamw: float32 moments; adam8bit: factors' moments at ~1/4 of that; embeddings, lm_head, norms float32
    assert 0 <= a["optimizer_state_bytes"] - 8 * (factors + emb + norms) <= 4 * 64
    assert abs(b["optimizer_state_bytes"] - (2 * factors * (1 + 4 / 256) + 8 * (emb + norms))) <= 4 * 64 + 8 * 64


# ----------------------------------------------------------------------------- optimizer state at a refresh


@pytest.mark.parametrize("how,optimizer,storage", [(h, o, "float32") for h in ("keep", "reset", "project")
                                                   for o in ("adamw", "adam8bit")] + [("project", "adamw", "bfloat16")])
def test_refresh_optimizer_state(how, optimizer, storage):
    """bfloat16: torch's AdamW keeps bf16 moments of a bf16 B; the projection runs in float32."""
    model = tiny_gpt().to(getattr(torch, storage))
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
            m, m2 = m.view(p.shape).float(), m2.view(p.shape).float()
            want = m @ C if lay.left else C @ m
            tol = {"adamw": 1e-6, "adam8bit": 0.08 * want.abs().max().item()}[optimizer]
            if storage == "bfloat16":  # bf16 moments: the result is rounded to 8 bits of mantissa
                tol = 2 ** -8 * want.abs().max().item()
            torch.testing.assert_close(m2, want, atol=tol, rtol=1e-5 if tol == 1e-6 else 0)


# ----------------------------------------------------------------------------- float16: skipped steps


def test_float16_refresh_is_skipped_with_its_step(monkeypatch):
    """A G with inf/NaN (a step the GradScaler skips) leaves that layer's Q, P, B and Adam state
    untouched; the layers with a finite G refresh. Without the guard the SVD raises. The inf is put
    into the bad layer's complete G as it reaches the projection, inside the backward."""
    model = tiny_gpt()
    c = loqt.Config(lora_r=8, optimizer="adam8bit", compensate_quant_error_iterations=2)
    loqt.wrap(model, c)
    tc = train_cfg(dtype="float16")
    opt = loqt.make_optimizer(model, c, tc)
    x = torch.randint(0, 257, (2, 17))
    layers = loqt.loqt_layers(model)
    bad, project = layers[3], loqt.project

    def poisoned(layer, G):
        if layer is bad:
            G[0, 0] = float("inf")
        project(layer, G)
    for step in range(2):  # a first refresh, then moments under a real projector
        if step == 1:
            monkeypatch.setattr(loqt, "project", poisoned)
        loqt.step_start(0, model, c, tc)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            loqt.after_step(0, model, opt, c, tc)
    assert all(lay.pending is not None for lay in layers)  # projected in the backward, nothing loaded yet
    snapshot = lambda lay: {**{k: v.clone() for k, v in lay.state_dict().items()},  # noqa: E731
                            **{"adam." + k: v.clone() for k, v in opt.state[lay.B].items() if torch.is_tensor(v)}}
    before = {lay: snapshot(lay) for lay in layers}
    out = loqt.after_step(1, model, opt, c, tc)
    assert out["refresh_skipped"].item() == pytest.approx(1 / len(layers))
    after = snapshot(bad)
    assert after.keys() == before[bad].keys() and all(torch.equal(after[k], before[bad][k]) for k in after)
    assert not torch.equal(layers[0].P.codes, before[layers[0]]["P.codes"])  # a finite G refreshes as usual


def test_float16_run_with_skipped_steps_finishes(train_run, tmp_path, monkeypatch):
    """End to end: a huge loss scale makes the GradScaler skip every step, refreshes included."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 60))
    out = train_run("--method", "loqt", "--dtype", "float16", "--update_proj_gap", "1", "--proj_gap_progression", "static",
                    "--num_training_steps", "2", "--eval_every", "100", "--lora_r", "8", save_dir=tmp_path / "f16")
    assert [r["method/refresh_skipped"] for r in out["metrics"] if "method/refresh" in r] == [1.0, 1.0]
    fresh = tiny_gpt()
    loqt.wrap(fresh, loqt.Config(lora_r=8))
    for k, v in ckpt_model(tmp_path / "f16").items():  # nothing moved: codes and factors as at wrap time
        if ".W." in k or ".P." in k or k.endswith(".B"):
            assert torch.equal(v, fresh.state_dict()[k]), k


# ----------------------------------------------------------------------------- runs: resume, per-layer, DDP


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_resume_exact_state_bytes_kept_and_model_pt_equals_wrapped(train_run, data_dir, tmp_path, storage):
    args = ["--method", "loqt", "--update_proj_gap", "2", "--proj_gap_progression", "static", "--optimizer", "adam8bit",
            "--adam8bit_embeddings", "--lora_r", "8", "--compensate_quant_error_iterations", "2", "--use_double_quant",
            "--eval_every", "100", "--storage_dtype", storage]
    full = train_run(*args, save_dir=tmp_path / "full")
    # --adam8bit_embeddings: 8-bit moments for the embeddings and lm_head too (r = 8 factors are under 4096: float32)
    r, h, f, L, V = 8, 128, 352, 4, 257
    factors, emb, norms = L * (4 * r * h + 3 * r * f), 2 * V * h, (2 * L + 1) * h
    assert abs(full["summary"]["optimizer_state_bytes"] - (8 * (factors + norms) + 2 * emb * (1 + 4 / 256))) <= 12 * 64
    train_run(*args, "--stop_at_step", "2", save_dir=tmp_path / "cut")  # refreshes at 0 before, 2 after the cut
    # resume through train.py's own stages: every optimizer state tensor keeps its dtype and bytes (8-bit codes too)
    saved = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    tc, method, mc = train.parse_args(TINY + ["--data_dir", data_dir, "--save_dir", str(tmp_path / "cut")] + args)
    run = train.setup(tc, method, mc)
    train.check_geometry(tc)
    train.build(run, 257)
    train.resume(run, str(tmp_path / "cut" / "ckpt.pt"))
    assert state_bytes(run.optimizer.state) == state_bytes(saved) > 0
    assert sum(v.dtype == torch.uint8 for st in run.optimizer.state.values() for v in st.values() if torch.is_tensor(v)) \
        == sum(v.dtype == torch.uint8 for st in saved.values() for v in st.values() if torch.is_tensor(v)) > 0
    resumed = train_run(*args, "--autoresume", save_dir=tmp_path / "cut")
    assert [r["step"] for r in full["metrics"] if "method/refresh" in r] == [1, 3]
    a, b = ckpt_model(tmp_path / "full"), ckpt_model(tmp_path / "cut")
    assert any(k.endswith("W.codes") for k in a)
    assert_same_weights(a, b, atol=0)  # bit for bit
    assert resumed["summary"]["train_loss"] == full["summary"]["train_loss"]
    # model.pt (dequantized, merged, plain GPT) gives the wrapped model's logits
    dtype = getattr(torch, storage)
    wrapped = tiny_gpt().to(dtype)
    loqt.wrap(wrapped, loqt.Config(lora_r=8, use_double_quant=True))
    wrapped.load_state_dict(a)
    plain = load_plain(os.path.join(tmp_path, "full", "model.pt")).to(dtype)
    x = torch.randint(0, 257, (2, 32))
    tol = 1e-5 if storage == "float32" else 0.03  # bf16: a few units in the last place of logits below 4
    torch.testing.assert_close(logits(plain, x), logits(wrapped, x), atol=tol, rtol=tol)


def test_per_layer_updates_equal_the_ordinary_step(train_run, tmp_path, monkeypatch):
    """Both modes project each layer's G inside its own backward and free it there: no layer holds a G
    after its backward, and when a projection starts every earlier G is already gone (one G exists
    at a time; before, the ordinary step kept all 28 until after the optimizer step). --per_layer_updates
    then steps and merges each layer inside the backward; float32 on the CPU the end weights equal the
    ordinary step's bit for bit (refreshes at updates 0, 2 and 4)."""
    backward, project, seen, live, alive_at_projection = loqt.LoQTMatmul.backward, loqt.project, set(), [], []
    earlier = []  # weak references to every G projected so far

    def spy(ctx, gy):  # after each layer's backward: how many layers hold any part of a G now
        out = backward(ctx, gy)
        seen.add(ctx.layer)
        live.append(sum(lay.grad_W is not None or len(lay.G_parts) > 0 for lay in seen))
        return out

    def spy_project(layer, G):
        alive_at_projection.append(sum(ref() is not None for ref in earlier))
        earlier.append(weakref.ref(G))
        project(layer, G)
    monkeypatch.setattr(loqt.LoQTMatmul, "backward", staticmethod(spy))
    monkeypatch.setattr(loqt, "project", spy_project)
    args = ["--method", "loqt", "--grad_clipping", "0", "--num_training_steps", "5", "--update_proj_gap", "2",
            "--proj_gap_progression", "static", "--lora_r", "8", "--eval_every", "100",
            "--compensate_quant_error_iterations", "2"]
    a = train_run(*args, save_dir=tmp_path / "whole")
    assert max(live) == 0 and len(alive_at_projection) == 3 * 28 and max(alive_at_projection) == 0
    seen.clear(), live.clear(), earlier.clear(), alive_at_projection.clear()
    b = train_run(*args, "--per_layer_updates", save_dir=tmp_path / "per_layer")
    assert max(live) == 0 and len(alive_at_projection) == 3 * 28 and max(alive_at_projection) == 0
    assert [r["step"] for r in b["metrics"] if "method/refresh" in r] == [1, 3, 5]
    assert [r["method/quant_err"] for r in a["metrics"] if "method/refresh" in r] == \
        [r["method/quant_err"] for r in b["metrics"] if "method/refresh" in r]
    assert_same_weights(ckpt_model(tmp_path / "whole"), ckpt_model(tmp_path / "per_layer"), atol=0)


class ReferenceRefresh:
    """The refresh step as loqt.py ran it before the projection moved into the backward, written out
    here with the same float operations: every layer's G = Σ δᵀx (float32, micro-step order) is kept
    whole until after the optimizer step, then each layer: SVD, new P, merge with the old P,
    compensated Q and B, projected Adam state. It stands in for loqt's step_start and after_step."""

    def __init__(self):
        self.G, self.handles = {}, []

    def step_start(self, step, model, cfg, train):
        if loqt.is_refresh_step(step, cfg, train):
            self.handles = [lay.register_forward_hook(functools.partial(self.capture, lay)) for lay in loqt.loqt_layers(model)]

    def capture(self, lay, module, args, y):  # y: LoQTMatmul's output, in the compute dtype; so was its x
        x = args[0].to(y.dtype).reshape(-1, args[0].shape[-1])

        def add(gy):  # the gradient LoQTMatmul.backward receives
            g = gy.reshape(-1, gy.shape[-1]).float().T @ x.float()
            self.G[lay] = g if lay not in self.G else self.G[lay].add_(g)
        y.register_hook(add)

    @torch.no_grad()
    def after_step(self, step, model, optimizer, cfg, train):
        for h in self.handles:
            h.remove()
        self.handles, stats = [], []
        for lay in loqt.loqt_layers(model):
            G = self.G.pop(lay, None)
            if G is None:
                continue
            P_old = lay.P.dequantize()
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            lay.P.load_(lay.P.encode(Vh[:lay.r] if lay.left else U[:, :lay.r]))
            W_fp = lay.merged_weight(P_old)
            P_new = lay.P.dequantize()
            err, err0 = loqt.compensated_init(lay, W_fp, cfg.compensate_quant_error_iterations, P_new)
            loqt.adjust_optimizer_state(lay, optimizer, cfg.refresh_optimizer_state, P_old, P_new)
            norm = W_fp.norm().clamp_min(1e-30)
            stats.append(torch.stack([err / norm, err0 / norm]))
        if not stats:
            return {}
        stats = torch.stack(stats).mean(0)
        return {"refresh": 1.0, "quant_err": stats[0], "quant_err_uncompensated": stats[1]}


def tiny_run(data_dir, method, *args):
    """train.py's stages up to the loop, for the tiny model and its data, with `method` as the method module."""
    tc, _, mc = train.parse_args(TINY + ["--data_dir", data_dir, "--method", "loqt", *args])
    run = train.setup(tc, method, mc)
    train.check_geometry(tc)
    train.prepare_data(run)
    train.build(run, run.data.vocab_size)
    return run


@pytest.mark.parametrize("storage,batch,total,offload,kept", [
    ("float32", 4, 4, False, None),         # one micro-step: G is complete in its first backward
    ("float32", 4, 8, False, "sum"),        # 2 micro-steps of 128 tokens: the running sum Σ δᵀx is smaller
    ("float32", 2, 4, True, "pairs"),       # 2 micro-steps of 64 tokens: (δ, x) is smaller; on the "host"
    ("bfloat16", 4, 4, False, None),
    ("bfloat16", 4, 8, False, "pairs"),     # 2 micro-steps of 128 bf16 tokens: pairs
    ("bfloat16", 2, 6, False, "mixed"),     # 3 micro-steps of 80 bf16 tokens: sums for attention, pairs for the MLP
])
def test_projection_in_the_backward_equals_the_refresh_after_the_step(data_dir, monkeypatch, storage, batch, total,
                                                                      offload, kept):
    """The refresh now projects each layer's G in its own backward and merges after the optimizer step;
    the reference keeps every G whole until after the step, as before. On the same model and batches
    (4 updates, refreshes at 0 and 2, clipping on, K = 2, NF4 W and P, adam8bit with projected moments)
    every weight, code, factor and optimizer state tensor is equal bit for bit, and so are the logged
    errors: each G is the same float32 sum in the same order, and everything after it is the same code
    on the same inputs. Gradient accumulation covers both ways a G waits between micro-steps."""
    args = ["--storage_dtype", storage, "--batch_size", str(batch), "--total_batch_size", str(total),
            "--max_length", "40" if kept == "mixed" else "32", "--update_proj_gap", "2", "--proj_gap_progression", "static", "--lora_r", "8",
            "--compensate_quant_error_iterations", "2", "--optimizer", "adam8bit", "--grad_clipping", "0.5",
            *(["--use_offloading"] if offload else [])]
    ref = ReferenceRefresh()
    reference = types.SimpleNamespace(**{k: getattr(loqt, k) for k in dir(loqt) if not k.startswith("__")})
    reference.step_start, reference.after_step = ref.step_start, ref.after_step
    sum_G, waited = loqt.sum_G, []

    def spy(layer, *a, **kw):  # how the layer's earlier micro-steps waited for the last one
        waited.append("pairs" if layer.G_parts else "sum" if layer.grad_W is not None else None)
        return sum_G(layer, *a, **kw)
    monkeypatch.setattr(loqt, "sum_G", spy)
    runs = {"new": tiny_run(data_dir, loqt, *args), "reference": tiny_run(data_dir, reference, *args)}
    events = {k: [] for k in runs}
    for name, run in runs.items():
        for step in range(4):
            torch.manual_seed(step)
            events[name].append(train.train_step(run, step)[2])
    new, old = runs["new"], runs["reference"]
    assert new.tc.grad_accum == total // batch and len(waited) == 2 * 28
    assert set(waited) == ({"pairs", "sum"} if kept == "mixed" else {kept})
    assert [sorted(e) for e in events["new"]] == [sorted(e) for e in events["reference"]] and events["new"][0]
    for a, b in zip(events["new"], events["reference"]):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert_same_weights(new.model.state_dict(), old.model.state_dict(), atol=0)
    sa, sb = new.optimizer.state_dict()["state"], old.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) if torch.is_tensor(sa[i][k]) else sa[i][k] == sb[i][k] for k in sa[i])
    lays = loqt.loqt_layers(new.model)
    assert all(l.pending is None and l.grad_W is None and not l.G_parts and l.collect_G is None for l in lays)


def test_ddp_ranks_agree(torchrun, tmp_path):
    """bf16 storage, NF4, adam8bit; every update refreshes; --check_ranks_every 1 compares a fingerprint
    of every parameter and buffer (NF4 codes included) across ranks after each update, exit 2 on a
    mismatch. (float32 DDP: the next test, against a single process.)"""
    proc = torchrun("--method", "loqt", "--update_proj_gap", "1", "--proj_gap_progression", "static",
                    "--optimizer", "adam8bit", "--compensate_quant_error_iterations", "2", "--storage_dtype", "bfloat16",
                    "--refresh_optimizer_state", "project", "--check_ranks_every", "1", "--lora_r", "8",
                    save_dir=tmp_path / "ddp")
    assert proc.returncode == 0 and "done:" in proc.stdout and "disagree" not in proc.stderr
    records = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["step"] for r in records if "method/refresh" in r] == [1, 2, 3, 4]



def test_rank_fingerprint_sees_a_changed_nf4_code():
    """--check_ranks_every compares train.fingerprint across ranks: one changed uint8 code of the NF4
    weights (no float tensor changed) changes it."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", 257))
    loqt.wrap(model, loqt.Config(lora_r=8))
    codes = [(k, v) for k, v in model.state_dict().items() if v.dtype == torch.uint8]
    assert codes
    before = train.fingerprint(model)
    name, t = codes[0]
    t.view(-1)[0] ^= 0x11  # both nibbles of the first byte: two weights' codes
    after = train.fingerprint(model)
    changed = (before != after).nonzero().flatten().tolist()
    assert changed == [list(model.state_dict()).index(name)]

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


# ----------------------------------------------------------------------------- memory (fake tensors)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    """One block, 128 wide, so that the full gradients G weigh: a fake-tensor estimate takes seconds."""
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    path.write_text(json.dumps({"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "max_sequence_length": 64}))
    return str(path)


def estimate(config, *args):
    import memory
    return memory.estimate(["--method", "loqt", "--model_config", config, "--batch_size", "1", "--max_length", "16",
                            "--lora_r", "8", "--compensate_quant_error_iterations", "2", "--grad_clipping", "0", *args],
                           vocab_size=257)


def test_memory_modes_on_fake_tensors(small_config):
    """Everything LoQT runs (wrap, the projection inside the backward, the merge, adam8bit) runs on fake
    tensors, and the memory claims hold. The ordinary step holds one layer's G at a time: its peak is
    within one G of per-layer updates' (before: all seven G until after the step, 2.50 MB against
    2.05). With one micro-step nothing waits, so nothing is offloaded. With two, --use_offloading puts
    on the host exactly what waits for the last micro-step: the (δ, x) pairs of 16 bf16 tokens, or, for
    256 tokens per micro-step, the float32 running sums Σ δᵀx."""
    G_one, G_all = 4 * 128 * 352, 4 * (4 * 128 * 128 + 3 * 128 * 352)  # float32 G: the largest layer, every layer
    base = estimate(small_config, "--optimizer", "adam8bit")
    per_layer = estimate(small_config, "--optimizer", "adam8bit", "--per_layer_updates")
    bf16 = estimate(small_config, "--optimizer", "adam8bit", "--storage_dtype", "bfloat16", "--adam8bit_embeddings")
    pairs = estimate(small_config, "--optimizer", "adam8bit", "--total_batch_size", "2", "--use_offloading")
    sums = estimate(small_config, "--optimizer", "adam8bit", "--batch_size", "4", "--max_length", "64",
                    "--total_batch_size", "8", "--use_offloading")
    assert base["host_bytes"] == 0 and per_layer["host_bytes"] == 0
    assert base["peak_bytes"] <= per_layer["peak_bytes"] + G_one
    assert pairs["host_bytes"] == 16 * (4 * (128 + 128) + 3 * (128 + 352)) * 2  # bf16 δ and x of micro-step 1
    assert sums["host_bytes"] == G_all
    assert bf16["weights_bytes"] < base["weights_bytes"] and bf16["optimizer_bytes"] < base["optimizer_bytes"]
