"""LTE (lte.py): heads on batch chunks, merges by averaging, mhlora, the reset variant, per-head
clipping, bf16 storage, per-layer updates, fake tensors and export, local mode on two ranks.

Float64 on a 2-layer width-16 model unless a test says otherwise or goes through train.py."""

import copy

import pytest
import torch

import lte
import train
from conftest import run_cli
from model import GPT, GPTConfig, load_plain

V, L, C, F, R, S = 31, 2, 16, 24, 4, 2.0  # vocab, layers, width, MLP width, head rank, scaling α/r


def make(num_heads=2, batch=4, **kw):
    """(wrapped model, an untouched copy, cfg, train config), float64."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=2, n_embd=C, intermediate_size=F, max_seq_len=16)).double()
    ref = copy.deepcopy(model)
    cfg = lte.Config(num_heads=num_heads, lora_r=R, lora_alpha=S * R, **kw)
    tc = train.TrainConfig(batch_size=batch)
    lte.wrap(model, cfg, tc)
    return model, ref, cfg, tc


def tokens(b, seed=1, t=8):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lte.LTELinear)]


@torch.no_grad()
def perturb(model, seed=2):
    """Stand-in for training: non-zero B (so A gets gradients), moved A and replicas."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lte.LTELinear):
            m.lora_B.add_(0.1 * torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype))
            m.lora_A.add_(0.1 * torch.randn(m.lora_A.shape, generator=g, dtype=m.lora_A.dtype))
        if isinstance(m, lte.Replicas):
            m.heads.add_(0.05 * torch.randn(m.heads.shape, generator=g, dtype=m.heads.dtype))


def effective_weights(layer):
    """Head h's weight W + s·(B_h A_h − B_h' A_h'), head by head (independent of lte.py's stacking)."""
    out = []
    for h in range(layer.num_heads):
        w = layer.weight + S * layer.lora_B[h] @ layer.lora_A[h]
        if layer.prev_A is not None:
            w = w - S * layer.prev_B[h] @ layer.prev_A[h]
        out.append(w)
    return out


@pytest.mark.parametrize("kw", [{}, {"mode": "mhlora"}, {"reset_lora": True, "non_linear": "shared"},
                                {"non_linear": "frozen"}])
def test_identity_at_init_and_semi_orthogonal_A(kw):
    model, ref, cfg, tc = make(**kw)
    x = tokens(4)
    for mode in (True, False):
        model.train(mode), ref.train(mode)
        torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=1e-12)
    for _, m in linears(model):
        N, r, n = m.lora_A.shape
        gram = m.lora_A @ m.lora_A.mT  # (N, r, r) = (n / r)·I: orthonormal rows times √(n/r)
        torch.testing.assert_close(gram, (n / r) * torch.eye(r, dtype=gram.dtype).expand(N, r, r))
        assert m.lora_B.abs().max() == 0 and not m.weight.requires_grad
    assert not torch.equal(model.lm_head.lora_A[0], model.lm_head.lora_A[1])  # heads start apart


def test_trainable_set_and_frozen_main_weights():
    model, _, cfg, tc = make(num_heads=2)
    N = 2
    lin = L * (4 * R * 2 * C + 3 * R * (C + F)) + R * (C + V)  # Σ r·(m + n) per head
    rep = V * C + (2 * L + 1) * C  # embedding + RMSNorm gains, one copy per head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == N * (lin + rep)
    model.train()
    perturb(model)
    model(tokens(4), tokens(4, seed=3))[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
    assert all(name.endswith(("lora_A", "lora_B", "heads")) for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("num_heads", [1, 3])
def test_merge_moves_W_to_the_head_mean_and_every_head_then_computes_W(num_heads):
    model, _, cfg, tc = make(num_heads=num_heads, batch=3 * num_heads)
    opt = lte.make_optimizer(model, cfg, tc)
    perturb(model, seed=2)
    lte.merge_heads(model, opt, cfg, tc, step=0)  # first merge: prev factors become non-zero
    perturb(model, seed=3)
    eff = {n: effective_weights(m) for n, m in linears(model)}
    reps = {n: m.heads.detach().clone() for n, m in model.named_modules() if isinstance(m, lte.Replicas)}
    x = tokens(2)
    xx = x.repeat(num_heads, 1)  # every chunk holds the same two sequences
    model.train()
    before = model(xx)[0]
    lte.merge_heads(model, opt, cfg, tc, step=1)
    for n, m in linears(model):  # W ← mean over heads of W + s·(B_h A_h − B_h' A_h')
        torch.testing.assert_close(m.weight, torch.stack(eff[n]).mean(0), rtol=0, atol=1e-12)
        for w in effective_weights(m):  # and every head's own weight is now W
            torch.testing.assert_close(w, m.weight, rtol=0, atol=1e-12)
    for n, m in model.named_modules():
        if isinstance(m, lte.Replicas):  # replicas: averaged, every copy set to the average
            torch.testing.assert_close(m.weight, reps[n].mean(0), rtol=0, atol=1e-15)
            assert torch.equal(m.heads, m.weight.expand_as(m.heads))
    model.eval()
    ev = model(x)[0]
    model.train()
    tr = model(xx)[0]
    for h in range(num_heads):  # every head's training function is the evaluation function
        torch.testing.assert_close(tr[2 * h:2 * h + 2], ev, rtol=0, atol=1e-12)
    if num_heads == 1:  # one head: the merge changes nothing that the head computes
        torch.testing.assert_close(tr, before, rtol=0, atol=1e-12)
    lte.merge_heads(model, opt, cfg, tc, step=2)  # a merge right after a merge: nothing changes
    model.eval()
    torch.testing.assert_close(model(x)[0], ev, rtol=0, atol=1e-12)
    model.train()
    torch.testing.assert_close(model(xx)[0], tr, rtol=0, atol=1e-12)


@torch.no_grad()
def test_training_forward_sends_chunk_h_through_head_h():
    model, _, cfg, tc = make(num_heads=3, batch=6)
    perturb(model, seed=2)
    lte.merge_heads(model, lte.make_optimizer(model, cfg, tc), cfg, tc, step=0)  # non-zero prev factors
    perturb(model, seed=3)
    layer = model.layers[1].mlp.down_proj
    x = torch.randn(6, 5, F, dtype=torch.float64)
    expected = torch.cat([x[2 * h:2 * h + 2] @ w.T for h, w in enumerate(effective_weights(layer))])
    layer.train()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    layer.eval()  # evaluation: W alone
    torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=0, atol=1e-13)


def test_gradient_of_head_h_depends_only_on_chunk_h():
    model, _, cfg, tc = make(num_heads=4, batch=8)
    perturb(model)
    model.train()

    def grads(x, y):
        model.zero_grad()
        model(x, y)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    x, y = tokens(8, seed=1), tokens(8, seed=2)
    g1 = grads(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[4:6], y2[4:6] = tokens(2, seed=5), tokens(2, seed=6)  # chunk 2 = rows 4, 5
    g2 = grads(x2, y2)
    for n in g1:
        for h in range(4):
            if h == 2:
                assert not torch.allclose(g1[n][h], g2[n][h]), n
            else:
                torch.testing.assert_close(g1[n][h], g2[n][h], rtol=0, atol=1e-15)


def test_mhlora_is_the_sum_of_heads_and_exports_it():
    model, _, cfg, tc = make(num_heads=3, batch=5, mode="mhlora")  # no chunks: any batch size
    perturb(model)
    layer = model.layers[0].mlp.up_proj
    x = torch.randn(5, 7, C, dtype=torch.float64)
    expected = x @ layer.weight.T
    for h in range(3):  # y = W x + Σ_h s·B_h A_h x (a sum, not a mean)
        expected = expected + S * (x @ layer.lora_A[h].T) @ layer.lora_B[h].T
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert lte.after_step(9, model, None, cfg, tc) == {}  # no merge in mhlora
    plain = GPT(model.config).double()
    plain.load_state_dict(lte.export(model, cfg))
    model.eval()
    idx = tokens(5)
    torch.testing.assert_close(plain(idx)[0], model(idx)[0], rtol=0, atol=1e-12)


def test_batch_not_divisible_by_heads_fails_clearly(data_dir):
    with pytest.raises(ValueError, match="--batch_size 6 .* divisible by --num_heads 4"):
        make(num_heads=4, batch=6)
    model, _, _, _ = make(num_heads=4, batch=8)
    model.train()
    with pytest.raises(ValueError, match="divisible by --num_heads 4, got 6"):
        model(tokens(6))
    proc = run_cli("--method", "lte", "--num_heads", "3", "--batch_size", "4", "--data_dir", data_dir)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --batch_size 4") and len(proc.stderr.strip().splitlines()) == 1


def test_one_head_merged_every_step_is_plain_lora():
    """N = 1, merge_iter 1, reset-less: after every update W = W0 + s·B A of an independent LoRA run."""
    model, ref, cfg, tc = make(num_heads=1, merge_iter=1)
    opt = lte.make_optimizer(model, cfg, tc)
    names = [n for n, _ in linears(model)]
    W0 = {n: ref.get_submodule(n).weight.detach().clone() for n in names}
    A = {n: model.get_submodule(n).lora_A[0].detach().clone().requires_grad_() for n in names}
    B = {n: torch.zeros_like(W0[n][:, :R]).requires_grad_() for n in names}
    for n in names:
        ref.get_submodule(n).weight.requires_grad_(False)
    ref_opt = torch.optim.AdamW(list(A.values()) + list(B.values()) + [p for p in ref.parameters() if p.requires_grad],
                                lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=0.0)
    model.train(), ref.train()
    for step in range(3):
        x, y = tokens(4, seed=10 + step), tokens(4, seed=20 + step)
        loss = model(x, y)[1]
        loss.backward()
        opt.step(), opt.zero_grad()
        lte.after_step(step, model, opt, cfg, tc)
        weights = {n + ".weight": W0[n] + S * B[n] @ A[n] for n in names}  # y = W0 x + s·B A x
        ref_loss = torch.func.functional_call(ref, weights, (x, y))[1]
        ref_loss.backward()
        ref_opt.step(), ref_opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for n in names:
        m = model.get_submodule(n)
        torch.testing.assert_close(m.weight, W0[n] + S * B[n] @ A[n], rtol=0, atol=1e-12)  # the merge
        torch.testing.assert_close(m.lora_A[0], A[n], rtol=0, atol=1e-12)
        torch.testing.assert_close(m.lora_B[0], B[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.embed_tokens.weight, ref.embed_tokens.weight, rtol=0, atol=1e-12)


def test_reset_variant_reinitialises_heads_and_zeroes_their_whole_adam_state():
    model, _, cfg, tc = make(num_heads=2, reset_lora=True)
    opt = lte.make_optimizer(model, cfg, tc)
    model.train()
    model(tokens(4), tokens(4, seed=3))[1].backward()
    opt.step(), opt.zero_grad()
    perturb(model)
    lay = model.layers[1].self_attn.v_proj
    delta = torch.stack([w - lay.weight for w in effective_weights(lay)]).mean(0)
    W, A = lay.weight.clone(), lay.lora_A.clone()
    kept = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
            for n, p in model.named_parameters() if n.endswith("heads")}
    lte.merge_heads(model, opt, cfg, tc, step=4)
    torch.testing.assert_close(lay.weight, W + delta, rtol=0, atol=1e-12)
    assert lay.prev_A is None and lay.lora_B.abs().max() == 0 and not torch.allclose(lay.lora_A, A)
    gram = lay.lora_A @ lay.lora_A.mT
    torch.testing.assert_close(gram, (C / R) * torch.eye(R, dtype=gram.dtype).expand(2, R, R))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n.endswith(("lora_A", "lora_B")):  # moments and step: a fresh Adam state
            assert all(v.abs().max() == 0 for v in opt.state[p].values()), n
        else:  # replicas keep theirs
            assert all(torch.equal(opt.state[p][k], v) for k, v in kept[id(p)].items()), n


def test_first_update_after_a_reset_is_a_first_adam_step():
    """Fresh heads must not inherit Adam's step: with the moments zeroed but the step at 1000, bias
    correction would be off and the first update lr·0.1/√(0.001/(1 − 0.999^1001)) = 2.5·lr."""
    model, _, cfg, tc = make(num_heads=2, reset_lora=True)
    opt = lte.make_optimizer(model, cfg, tc)
    model.train()
    model(tokens(4), tokens(4, seed=3))[1].backward()
    opt.step(), opt.zero_grad()
    for st in opt.state.values():
        st["step"].fill_(1000.0)  # as if after a long run
    lte.merge_heads(model, opt, cfg, tc, step=999)
    heads = {n: p for n, p in model.named_parameters() if n.endswith("lora_B")}  # B = 0: A has no gradient yet
    before = {n: p.detach().clone() for n, p in heads.items()}
    model(tokens(4, seed=4), tokens(4, seed=5))[1].backward()
    opt.step()
    for n, p in heads.items():  # a first Adam step moves an entry by lr·|g|/(|g| + eps) <= lr
        assert opt.state[p]["step"].item() == 1, n
        step = (p - before[n]).abs()
        assert step.max() <= tc.lr * (1 + 1e-9) and step.max() > 0.99 * tc.lr, (n, step.max().item() / tc.lr)


def head_grads(model, x, y, clip):
    """Gradients after lte.before_step and train.py's global clip (its order in train_step)."""
    model.zero_grad()
    model(x, y)[1].backward()
    tc = train.TrainConfig(batch_size=x.shape[0], grad_clipping=clip, log_every=1)
    cfg = lte.Config(num_heads=4)
    out = lte.before_step(0, model, None, cfg, tc)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    return grads, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, out


def test_clipping_is_per_head_so_a_head_never_feels_another_chunk():
    model, _, cfg, tc = make(num_heads=4, batch=8)
    perturb(model)
    model.train()
    x, y = tokens(8, seed=1), tokens(8, seed=2)
    x2, y2 = x.clone(), y.clone()
    x2[4:6], y2[4:6] = tokens(2, seed=5), tokens(2, seed=6)  # chunk 2 only
    clip = 1e-2  # far below every head's gradient norm: all heads are clipped
    mine1, g1, out = head_grads(model, x, y, clip)
    mine2, g2, _ = head_grads(model, x2, y2, clip)
    norms = torch.stack([lte.slice_norms(g) for g in mine1.values()]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms, torch.full((4,), clip / 2, dtype=norms.dtype), rtol=1e-6, atol=0)  # c/√N each
    assert out["head_grad_norm_max"] > 10 * clip
    for n in g1:  # train.py's clip then changes nothing but its guard's factor c/(c + 1e-6) = 1 - 1e-4
        torch.testing.assert_close(g1[n], mine1[n], rtol=2e-4, atol=0)
        for h in (0, 1, 3):  # heads whose chunk did not change: the same step (the guard's factor moves by ~1e-8)
            torch.testing.assert_close(g1[n][h], g2[n][h], rtol=1e-6, atol=0)
        assert not torch.allclose(g1[n][2], g2[n][2])
    # shared copies form one more group: G = N + 1
    model, _, cfg, tc = make(num_heads=4, batch=8, non_linear="shared")
    perturb(model)
    model.train()
    mine, _, _ = head_grads(model, x, y, clip)
    shared = [g for n, g in mine.items() if n.endswith("heads")]
    torch.testing.assert_close(torch.stack([g.norm() for g in shared]).norm(), torch.tensor(clip / 5 ** 0.5, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def make_stored(storage, num_heads=2, batch=4, **kw):
    """(wrapped model, cfg, train config) built as train.py builds: on the meta device, then each
    layer materialized in the storage dtype just before wrap() replaces it."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=2, n_embd=C, intermediate_size=F, max_seq_len=16))
    model.plan("cpu", storage)
    cfg = lte.Config(num_heads=num_heads, lora_r=R, **kw)
    tc = train.TrainConfig(batch_size=batch, storage_dtype=str(storage).split(".")[-1])
    lte.wrap(model, cfg, tc)
    model.materialize()
    model.plan(None)
    return model, cfg, tc


def test_bf16_storage_keeps_factors_float32_so_small_steps_are_not_lost():
    """W and replicas in bf16, factors and prev factors in float32: one AdamW step at lr 1e-4 (the
    paper's 0.05-0.1x LR) moves every head's A, which in bf16 (an ulp of 2^-8 at |A| ~ 0.5) it would not."""
    model, cfg, tc = make_stored(torch.bfloat16)
    for n, t in model.state_dict().items():
        want = torch.float32 if n.endswith(("lora_A", "lora_B", "prev_A", "prev_B")) else torch.bfloat16
        assert t.dtype == want, (n, t.dtype)
    perturb(model)
    tc.lr = 1e-4
    opt = lte.make_optimizer(model, cfg, tc)
    A = {n: m.lora_A.detach().clone() for n, m in linears(model)}
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens(4), tokens(4, seed=3))[1]
    loss.backward()
    opt.step()
    for n, m in linears(model):
        moved = (m.lora_A - A[n]).abs().flatten(1).max(1).values  # (N,): the largest move of each head
        assert (moved > 0.5e-4).all() and (moved < 1.01e-4).all(), (n, moved)  # float32 rounding at |A| ~ 0.5


@torch.no_grad()
def test_bf16_merge_keeps_the_mean_function_and_a_second_merge_changes_nothing():
    """--storage_dtype bfloat16 with a paper-sized s = 32: the merged model computes the float32 mean
    of the heads' weights to bf16 tolerance, every head computes W after the merge, and a second
    merge right after leaves W bit-identical (the prev factors are exact float32 copies)."""
    s = 32.0
    model, cfg, tc = make_stored(torch.bfloat16, num_heads=2, lora_alpha=s * R)
    g = torch.Generator().manual_seed(7)
    opt = lte.make_optimizer(model, cfg, tc)
    for step in range(2):  # two rounds of "training" then a merge: the second has non-zero prev factors
        for m in model.modules():
            if isinstance(m, lte.LTELinear):
                m.lora_A.add_(0.1 * torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.add_(0.3 / s * torch.randn(m.lora_B.shape, generator=g))
            if isinstance(m, lte.Replicas):
                m.heads.add_(0.05 * torch.randn(m.heads.shape, generator=g).to(m.heads.dtype))
        if step == 0:
            lte.merge_heads(model, opt, cfg, tc, step=0)
    mean = {}  # the float32 mean of the heads' effective weights, computed head by head
    for n, m in linears(model):
        eff = [m.weight.float() + s * (m.lora_B[h] @ m.lora_A[h] - m.prev_B[h] @ m.prev_A[h]) for h in range(2)]
        mean[n + ".weight"] = torch.stack(eff).mean(0)
    for n, m in model.named_modules():
        if isinstance(m, lte.Replicas):
            mean[n + ".weight"] = m.heads.float().mean(0)
    ref = GPT(model.config)
    ref.load_state_dict(mean)
    ref_bf16 = copy.deepcopy(ref).bfloat16()
    x = tokens(2)
    lte.merge_heads(model, opt, cfg, tc, step=1)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ev = model(x)[0].float()
        ev_ref = ref_bf16(x)[0].float()
        model.train()
        tr = model(x.repeat(2, 1))[0].float()
    exact = ref(x)[0]
    scale = exact.abs().max()
    assert (ev_ref - exact).abs().max() > 1e-4 * scale  # bf16 is not exact here...
    assert (ev - exact).abs().max() <= 2 * (ev_ref - exact).abs().max() + 1e-3 * scale  # ...and the merge adds nothing
    for h in range(2):  # every head computes the evaluation function again
        torch.testing.assert_close(tr[2 * h:2 * h + 2], ev, rtol=0, atol=1e-3 * scale.item())
    W = {n: m.weight.clone() for n, m in linears(model)}
    lte.merge_heads(model, opt, cfg, tc, step=2)
    assert all(torch.equal(m.weight, W[n]) for n, m in linears(model))


def test_bf16_resume_is_exact(train_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = TINY_LTE + ("--num_training_steps", "5", "--storage_dtype", "bfloat16")
    train_run(*args, save_dir=a)
    train_run(*args, "--stop_at_step", "3", save_dir=b)
    train_run(*args, "--autoresume", save_dir=b)
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["model"]["lm_head.weight"].dtype == torch.bfloat16 and ca["model"]["lm_head.lora_A"].dtype == torch.float32
    for k in ca["model"]:
        assert torch.equal(cb["model"][k], ca["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sb[i][k], sa[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("extra", [(), ("--reset_lora",)])
def test_per_layer_updates_equal_ordinary_updates(train_run, tmp_path, extra):
    """--per_layer_updates steps each head tensor inside the backward; over 5 updates with merges
    after 2, 4 and 5 the run ends exactly where the ordinary one does (clipping off in both)."""
    args = TINY_LTE + ("--num_training_steps", "5", "--grad_clipping", "0") + extra
    train_run(*args, save_dir=tmp_path / "a")
    train_run(*args, "--per_layer_updates", save_dir=tmp_path / "b")
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    for k in ca["model"]:
        assert torch.equal(cb["model"][k], ca["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sb[i][k], sa[i][k]) for i in sa for k in sa[i])


def test_fake_tensors_and_export_one_layer_at_a_time():
    """Under FakeTensorMode, as memory.py runs it: a training update with the per-head clip and a
    merge (metrics are 0-dim tensors, no .item()), then export with the model on a stand-in device
    (meta: a CPU-only torch cannot move fake tensors to "cuda"): every tensor comes back on the
    CPU, and the device never holds more than about one extra layer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import memory
    for mode in ("ddp", "mhlora"):
        meter = memory.MemoryMeter("meta", round_to=0)  # live bytes on the stand-in device
        with FakeTensorMode(), meter:
            with torch.device("meta"):
                model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=2, n_embd=C, intermediate_size=F, max_seq_len=16))
            model.plan("meta", torch.float32)  # every layer wrap() materializes lands on the stand-in device
            cfg = lte.Config(num_heads=2, lora_r=R, merge_iter=1, mode=mode)
            tc = train.TrainConfig(batch_size=4, log_every=1)
            lte.wrap(model, cfg, tc)
            opt = lte.make_optimizer(model, cfg, tc)
            x = torch.randint(0, V, (4, 8), device="meta")
            model(x, x)[1].backward()
            events = lte.before_step(0, model, opt, cfg, tc)
            opt.step()
            events.update(lte.after_step(0, model, opt, cfg, tc))
            assert all(not torch.is_tensor(v) or v.dim() == 0 for v in events.values())
            assert mode == "mhlora" or "merge_rel_update" in events
            meter.peak = before = sum(meter.now.values())
            sd = lte.export(model, cfg)
            extra = meter.peak - before
        assert all(t.device.type == "cpu" for t in sd.values())
        layer = max(m.weight.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, lte.LTELinear))
        assert extra <= 3 * 4 * layer < sum(t.numel() * 4 for t in sd.values()) / 2, (mode, extra)


@torch.no_grad()
def test_export_is_the_eval_function_and_leaves_the_model_alone():
    model, _, cfg, tc = make(num_heads=2)
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = lte.export(model, cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = GPT(model.config).double()
    plain.load_state_dict(sd)  # strict: exactly a plain GPT's keys
    model.eval()
    torch.testing.assert_close(plain(tokens(3))[0], model(tokens(3))[0], rtol=0, atol=0)


def test_comm_bytes_formula():
    model, _, cfg, tc = make(num_heads=2, mode="local", merge_iter=5)
    plain = sum(t.numel() for t in lte.export(model, cfg).values())
    lin = L * (4 * C * C + 3 * C * F) + V * C
    heads = 2 * (L * (4 * R * 2 * C + 3 * R * (C + F)) + R * (C + V))
    got = lte.comm_bytes_per_step(model, cfg)
    assert got["full_ddp"] == 4 * plain
    assert got["lte"] == 4 * (lin + heads + (plain - lin)) / 5  # one m×n per layer, factors, replicas' mean
    cfg.reset_lora = True
    assert lte.comm_bytes_per_step(model, cfg)["lte"] == 4 * plain / 5


TINY_LTE = ("--method", "lte", "--num_heads", "2", "--lora_r", "4", "--merge_iter", "2")


def test_resume_is_exact_and_model_pt_is_the_wrapped_model_in_eval(train_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_run(*TINY_LTE, "--num_training_steps", "5", save_dir=a)  # merges after 2, 4 and the last
    out = train_run(*TINY_LTE, "--num_training_steps", "5", "--stop_at_step", "3", save_dir=b)  # between merges
    assert out["summary"]["interrupted"]
    train_run(*TINY_LTE, "--num_training_steps", "5", "--autoresume", save_dir=b)
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=0, atol=1e-6)
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=0, atol=1e-6)
    plain = load_plain(str(a / "model.pt"))
    model = GPT(plain.config)
    lte.wrap(model, lte.Config(num_heads=2, lora_r=4, merge_iter=2), train.TrainConfig(batch_size=4))
    model.load_state_dict(ca["model"])
    model.eval(), plain.eval()
    idx = tokens(2, t=32)
    with torch.no_grad():
        torch.testing.assert_close(plain(idx)[0], model(idx)[0], rtol=0, atol=0)
    merges = [r for r in ca["records"] if "method/comm_MB" in r]
    assert [r["step"] for r in merges] == [2, 4, 5]


def test_ranks_agree_under_ddp(torchrun, tmp_path):
    torchrun(*TINY_LTE, "--check_ranks_every", "1", save_dir=tmp_path / "d")


@pytest.mark.slow
def test_local_mode_resume_equals_an_unbroken_run(torchrun, tmp_path):
    """2 ranks, --mode local: stopped between merges and resumed, the run ends exactly where an
    unbroken one does: every rank's heads, replicas and Adam moments travel through get_state."""
    args = TINY_LTE + ("--mode", "local", "--num_training_steps", "5")
    torchrun(*args, "--check_ranks_every", "2", save_dir=tmp_path / "a")  # merges after 2, 4 and the last
    b = tmp_path / "b"
    torchrun(*args, "--stop_at_step", "3", save_dir=b)  # no rank check: update 3 is between merges
    st = torch.load(b / "ckpt.pt", weights_only=True)["method_state"]["per_rank"]
    assert st["lm_head.lora_B/param"].shape[0] == 2 and not torch.equal(*st["lm_head.lora_B/param"])  # own data only
    assert not torch.equal(*st["lm_head.lora_B/exp_avg_sq"])
    proc = torchrun(*args, "--autoresume", "--check_ranks_every", "2", save_dir=b)  # agree after 4 and 5
    assert "resumed from" in proc.stdout
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "a", b))
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=0, atol=1e-6)
    pa, pb = ca["method_state"]["per_rank"], cb["method_state"]["per_rank"]
    assert pa.keys() == pb.keys() and any(k.endswith("exp_avg") for k in pa)
    for k in pa:  # rank 1's moments too, which no plain optimizer checkpoint holds
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=1e-6)


def local_ranks_worker(rank, init_file):
    """One of two gloo ranks running --mode local by hand (test_local_mode_with_ranks)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model, ref, cfg, tc = make(num_heads=2, mode="local")
        assert lte.local_world(cfg) == 2
        x = tokens(4)
        with torch.no_grad():  # identity at init on every rank
            for mode in (True, False):
                model.train(mode), ref.train(mode)
                torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=1e-12)
        opt = lte.make_optimizer(model, cfg, tc)
        model.train()
        model(tokens(4, seed=10 + rank), tokens(4, seed=20 + rank))[1].backward()  # each rank its own data
        opt.step()
        perturb(model, seed=2 + rank)

        def gather(t):
            got = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(got, t.contiguous())
            return torch.stack(got)

        with torch.no_grad():
            mean_eff = {n: gather(torch.stack(effective_weights(m))).mean((0, 1)) for n, m in linears(model)}
            reps = {n: gather(m.heads.detach()).mean((0, 1)) for n, m in model.named_modules() if isinstance(m, lte.Replicas)}
            own_B = model.lm_head.lora_B.detach().clone()
            own_v = opt.state[model.lm_head.lora_B]["exp_avg_sq"].clone()
            assert not torch.equal(*gather(own_B)) and not torch.equal(*gather(own_v))  # the ranks differ
            state = lte.get_state(model, opt, cfg)
            lte.merge_heads(model, opt, cfg, tc, step=1)
            for n, m in linears(model):  # W <- mean over ranks and heads; every head on every rank computes W
                torch.testing.assert_close(m.weight, mean_eff[n], rtol=0, atol=1e-12)
                assert torch.equal(*gather(m.weight)) and torch.equal(*gather(m.lora_A)) and torch.equal(*gather(m.lora_B))
                for w in effective_weights(m):
                    torch.testing.assert_close(w, m.weight, rtol=0, atol=1e-12)
            for n, m in model.named_modules():
                if isinstance(m, lte.Replicas):
                    torch.testing.assert_close(m.weight, reps[n], rtol=0, atol=1e-15)
            lte.set_state(model, opt, cfg, state)  # each rank gets its own pre-merge heads and moments back
            assert torch.equal(model.lm_head.lora_B, own_B)
            assert torch.equal(opt.state[model.lm_head.lora_B]["exp_avg_sq"], own_v)
    finally:
        dist.destroy_process_group()


def test_local_mode_with_ranks(tmp_path):
    """--mode local on two real gloo ranks (no torchrun): identity at init, ranks that differ before a
    merge and agree after it, W = the mean over ranks and heads, get_state/set_state per rank."""
    import torch.multiprocessing as mp
    mp.spawn(local_ranks_worker, args=(str(tmp_path / "init"),), nprocs=2)


@torch.no_grad()
def test_set_state_gives_each_rank_its_own_heads_and_moments(monkeypatch):
    """The local-mode checkpoint holds every rank's tensors; rank 1 must get slice 1 back."""
    model, _, cfg, tc = make(num_heads=2, mode="local")
    opt = lte.make_optimizer(model, cfg, tc)
    with torch.enable_grad():
        model(tokens(4), tokens(4, seed=3))[1].backward()
    opt.step()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    state = {"world": 2, "per_rank": {}}
    for i, (n, p) in enumerate(named):
        state["per_rank"][n + "/param"] = torch.stack([p + 1, p + 2 + i])
        for k in ("exp_avg", "exp_avg_sq"):
            state["per_rank"][f"{n}/{k}"] = torch.stack([opt.state[p][k] + 1, opt.state[p][k] + 3 + i])
    expect = {n: (p + 2 + i, opt.state[p]["exp_avg_sq"] + 3 + i) for i, (n, p) in enumerate(named)}
    monkeypatch.setattr(lte, "local_world", lambda cfg: 2)
    monkeypatch.setattr(lte.dist, "get_rank", lambda: 1)
    lte.set_state(model, opt, cfg, state)
    for n, p in named:
        assert torch.equal(p, expect[n][0]) and torch.equal(opt.state[p]["exp_avg_sq"], expect[n][1]), n
    with pytest.raises(ValueError, match="made on 3 ranks"):
        lte.set_state(model, opt, cfg, {**state, "world": 3})
