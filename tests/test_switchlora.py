"""SwitchLoRA (switchlora.py): every claim of its docstring as a test. float64 on tiny dims unless noted."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

import switchlora as sl
import train
from model import GPT, GPTConfig, load_plain

SMALL = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=48, max_seq_len=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and a busy 2-core machine makes them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = ["--method", "switchlora", "--lora_rank", "8", "--fix_switch_lora_interval", "--switch_lora_interval", "10"]


def small_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return GPT(SMALL).to(dtype)


def wrapped(dtype=torch.float64, steps=100, device="cpu", **kw):
    cfg = sl.Config(**{"lora_rank": 4, **kw})
    tc = train.TrainConfig(num_training_steps=steps)
    model = small_model(dtype).to(device)  # train.py moves the model to its device before wrap
    sl.wrap(model, cfg, tc)
    return model, cfg, tc


def tokens(seed=1, batch=3, T=16):
    return torch.randint(0, SMALL.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(seed))


def train_steps(model, opt, n, before=None, seed=1):
    """n optimizer steps on random tokens; before(step) runs after backward, before opt.step()."""
    for i in range(n):
        x = tokens(seed + i)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if before:
            before(i)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("init", ["switchlora", "origin_lora"])
def test_identity_at_init_and_frozen_W(init):
    x = tokens()[:, :-1]
    plain = small_model()
    model, cfg, _ = wrapped(init_lora_type=init)
    assert torch.allclose(model(x)[0], plain(x)[0], atol=1e-10, rtol=0)
    layers = sl.lora_layers(model)
    assert len(layers) == 2 * 7
    for _, m in layers:
        assert not m.weight.requires_grad and m.lora_A.requires_grad and m.lora_B.requires_grad
        assert (m.lora_B.abs().sum() > 0) == (init == "switchlora")  # origin_lora: B = 0
        # A and B are checked out of the pools
        assert torch.equal(m.lora_A, m.candidates_A[m.selected_A]) and torch.equal(m.lora_B, m.candidates_B[m.selected_B].t())
    n_lora = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers)
    n_rest = sum(p.numel() for n, p in plain.named_parameters() if "attn" not in n and "mlp" not in n)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_lora + n_rest
    _, loss = model(tokens()[:, :-1], tokens()[:, 1:])
    loss.backward()
    assert all(m.weight.grad is None for _, m in layers)  # frozen W gets no gradient


def test_init_std_balances_the_product():
    """§3.2: std_A·std_B = gain·sqrt(r/n) (so s·B·A has nn.Linear's variance) and std_A/std_B = (m/n)^(1/4)."""
    m, n, r = 352, 128, 32
    ba, bb = sl.init_bounds(m, n, r, "switchlora")
    sa, sb = ba / math.sqrt(3), bb / math.sqrt(3)
    assert math.isclose(sa * sb, math.sqrt(1 / 3) * math.sqrt(r / n), rel_tol=1e-12)
    assert math.isclose(sa / sb, (m / n) ** 0.25, rel_tol=1e-12)
    assert sl.init_bounds(m, n, r, "origin_lora") == (pytest.approx(1 / math.sqrt(n)), 0.0)


@pytest.mark.parametrize("discontinuous", [False, True])
def test_switch_keeps_logits_and_writes_back(discontinuous):
    model, cfg, tc = wrapped(lora_rank=8, discontinuous_switch=discontinuous)
    opt = sl.make_optimizer(model, cfg, tc)
    train_steps(model, opt, 3)  # A and B now differ from their candidates
    model.eval()
    x = tokens(7)[:, :-1]
    before = model(x)[0]
    gen = torch.Generator().manual_seed(0)
    for _, m in sl.lora_layers(model):
        old_sel_a, old_a = m.selected_A.clone(), m.lora_A.detach().clone()
        slots_a, slots_b = m.switch(3, cfg.adam_warm_step, discontinuous, gen)
        assert len(set(slots_a.tolist()) | set(slots_b.tolist())) == 6  # row i of A and column i of B never together
        assert torch.equal(m.candidates_A[old_sel_a[slots_a]], old_a[slots_a])  # trained vectors back in the pool
        assert torch.equal(m.lora_A[slots_a], m.candidates_A[m.selected_A[slots_a]])
        assert len(set(m.selected_A.tolist())) == cfg.lora_rank  # no candidate checked out twice
        assert m.frozen_B[slots_a].eq(cfg.adam_warm_step).all() and m.frozen_A[slots_b].eq(cfg.adam_warm_step).all()
    assert torch.allclose(model(x)[0], before, atol=1e-10, rtol=0)


def test_continuous_mode_slides_the_window():
    model, cfg, _ = wrapped()
    m = sl.lora_layers(model)[0][1]  # 32x32: N_c = 32, r = 4
    assert m.selected_A.tolist() == [28, 29, 30, 31] and m.selected_B.tolist() == [30, 31, 28, 29]
    assert (m.ptr_A, m.ptr_B) == (0, 2)
    m.switch(2, 5, False, None)
    assert m.selected_A.tolist() == [0, 1, 30, 31] and m.selected_B.tolist() == [30, 31, 0, 1]
    assert (m.ptr_A, m.ptr_B) == (2, 0)
    assert m.max_switch() == 0  # each pointer now faces 2 frozen slots of its factor


def test_counterpart_state_zeroed_switched_vector_keeps_state():
    model, cfg, tc = wrapped()
    opt = sl.make_optimizer(model, cfg, tc)
    train_steps(model, opt, 3)
    m = sl.lora_layers(model)[3][1]
    snap = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (m.lora_A, m.lora_B)}
    assert snap[m.lora_A]["step"].shape == (4, 1) and snap[m.lora_B]["step"].shape == (1, 4)
    slots_a, slots_b = m.switch(1, cfg.adam_warm_step, False, None)
    sl.zero_counterpart_state(m, opt, slots_a, slots_b, cfg)
    i, j = slots_a.item(), slots_b.item()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        A_new, B_new, A_old, B_old = opt.state[m.lora_A][key], opt.state[m.lora_B][key], snap[m.lora_A][key], snap[m.lora_B][key]
        assert B_new[:, i].eq(0).all() and A_new[j].eq(0).all()  # the counterparts: zeroed
        assert B_old[:, i].ne(0).all() and A_old[j].ne(0).all()  # (they were not zero before)
        keep_a = [t for t in range(4) if t != j]
        keep_b = [t for t in range(4) if t != i]
        assert torch.equal(A_new[keep_a], A_old[keep_a])  # includes the switched row i of A: its state is kept
        assert torch.equal(B_new[:, keep_b], B_old[:, keep_b])  # includes the switched column j of B


def test_remain_flags_and_zero_init_B():
    model, cfg, tc = wrapped(remain_switch_state=True, zero_init_B=True)
    opt = sl.make_optimizer(model, cfg, tc)
    train_steps(model, opt, 2)
    m = sl.lora_layers(model)[0][1]
    snap = {k: v.clone() for k, v in opt.state[m.lora_B].items()}
    cand_b, sel_b = m.candidates_B.clone(), m.selected_B.clone()
    slots_a, slots_b = m.switch(2, cfg.adam_warm_step, False, None)
    sl.zero_counterpart_state(m, opt, slots_a, slots_b, cfg)
    assert len(slots_b) == 0 and torch.equal(m.selected_B, sel_b) and torch.equal(m.candidates_B, cand_b)  # B never switches
    assert cand_b.eq(0).all() and m.frozen_A.eq(0).all()
    st = opt.state[m.lora_B]
    assert torch.equal(st["exp_avg"], snap["exp_avg"]) and torch.equal(st["exp_avg_sq"], snap["exp_avg_sq"])  # moments kept
    assert st["step"][0, slots_a].eq(0).all()  # but the counterpart's step still restarts


def test_frozen_counterpart_does_not_move_for_adam_warm_step_steps():
    model, cfg, tc = wrapped(adam_warm_step=3)
    opt = sl.make_optimizer(model, cfg, tc)
    train_steps(model, opt, 2)
    layers = [m for _, m in sl.lora_layers(model)]
    hist, slots = [], {}

    def before(step):
        for m in layers:
            if step == 0:
                slots[m] = m.switch(1, cfg.adam_warm_step, False, None)
                sl.zero_counterpart_state(m, opt, *slots[m], cfg)
            m.freeze_grads()
            i, j = slots[m]
            assert m.lora_B.grad[:, i].eq(0).all() == (step < 3) and m.lora_A.grad[j].eq(0).all() == (step < 3)
        hist.append([(m.lora_B[:, slots[m][0]].detach().clone(), m.lora_A[slots[m][1]].detach().clone()) for m in layers])

    train_steps(model, opt, 5, before, seed=10)
    for li, m in enumerate(layers):
        b0, a0 = hist[0][li]
        for s in (1, 2, 3):  # after the updates of steps 0, 1, 2: unchanged
            assert torch.equal(hist[s][li][0], b0) and torch.equal(hist[s][li][1], a0)
        assert not torch.equal(hist[4][li][0], b0) and not torch.equal(hist[4][li][1], a0)  # moves after 3 steps
        assert opt.state[m.lora_B]["step"][0, slots[m][0]].item() == 5  # its step restarted at the switch
        steps_a = opt.state[m.lora_A]["step"][:, 0].tolist()
        assert [int(v) for v in steps_a] == [5 if t == slots[m][1].item() else 7 for t in range(4)]


def test_step_adamw_equals_torch_adamw_when_nothing_switches():
    ref, cfg, tc = wrapped(switch_lora=False)
    mine, _, _ = wrapped(switch_lora=False)
    tc.weight_decay, tc.lr = 0.1, 1e-2
    o_mine = sl.make_optimizer(mine, cfg, tc)
    assert [g["step_dim"] for g in o_mine.param_groups] == [0, 1, -1, -1]
    ref_params, name_of = dict(ref.named_parameters()), {id(p): n for n, p in mine.named_parameters()}
    o_ref = torch.optim.AdamW([{"params": [ref_params[name_of[id(p)]] for p in g["params"]],
                                "weight_decay": g["weight_decay"]} for g in o_mine.param_groups], lr=1e-2)
    train_steps(ref, o_ref, 6)
    train_steps(mine, o_mine, 6)
    for (n, p), q in zip(ref.named_parameters(), mine.parameters()):
        assert torch.allclose(p, q, atol=1e-12, rtol=0), n
    a = sl.lora_layers(mine)[0][1].lora_A
    assert o_mine.state[a]["step"].eq(6).all()


def test_switch_schedule_values():
    """The worked example of METHODS.md §3.3(a): r 256, T 40000, D 4000 -> interval 40, 133, 444, 1482."""
    cfg, tc = sl.Config(), train.TrainConfig(num_training_steps=40000)
    for t, want in ((-1, 40), (3999, 133.3), (7999, 444.4), (11999, 1481.5)):
        assert sl.switch_interval(t, cfg, tc) == pytest.approx(want, rel=1e-3)
    cfg.fix_switch_lora_interval = True
    assert sl.switch_interval(30000, cfg, tc) == 40


def switch_counts(cfg, tc, n_layers=4, dim=64):
    net = nn.ModuleDict({f"mlp{i}": nn.Linear(dim, dim, bias=False) for i in range(n_layers)})
    sl.wrap(net, cfg, tc)
    opt = sl.make_optimizer(net, cfg, tc)
    layers = [m for _, m in sl.lora_layers(net)]
    counts = []
    for step in range(tc.num_training_steps):
        before = [m.n_switched for m in layers]
        sl.before_step(step, net, opt, cfg, tc)
        counts.append([m.n_switched - b for m, b in zip(layers, before)])
    return torch.tensor(counts, dtype=torch.float64)  # (steps, layers)


def test_number_of_switches_follows_the_schedule():
    """Stochastic rounding of r/interval(t). Tolerance: 5 standard deviations of the sampled sum."""
    r = 32
    # fixed interval 20: 1.6 per step per layer (floor 1, +1 with p 0.6)
    cfg = sl.Config(lora_rank=r, fix_switch_lora_interval=True, switch_lora_interval=20)
    c = switch_counts(cfg, train.TrainConfig(num_training_steps=300))
    assert set(c.unique().tolist()) == {1.0, 2.0}
    sd = math.sqrt(0.24 * c.numel())
    assert abs(c.sum().item() - 1.6 * c.numel()) < 5 * sd
    # decaying interval (interval_0 10, D = 0.1 x 300 = 30): compare the total with the sum of r/interval(t)
    cfg = sl.Config(lora_rank=r, switch_lora_interval=10, adam_warm_step=2)
    tc = train.TrainConfig(num_training_steps=300)
    c = switch_counts(cfg, tc)
    e = torch.tensor([r / sl.switch_interval(t, cfg, tc) for t in range(300)], dtype=torch.float64)
    frac = e - e.floor()
    assert (c >= e.floor().unsqueeze(1)).all() and (c <= e.ceil().unsqueeze(1)).all()  # never capped here
    sd = math.sqrt((frac * (1 - frac)).sum().item() * c.shape[1])
    assert abs(c.sum().item() - e.sum().item() * c.shape[1]) < 5 * sd + 1e-9


def test_candidates_survive_the_cpu_round_trip():
    """A trained vector goes back to the CPU pool and comes out bit-identical when the window returns."""
    net = nn.ModuleDict({"mlp": nn.Linear(8, 8, bias=False)}).double()
    cfg, tc = sl.Config(lora_rank=4), train.TrainConfig()
    sl.wrap(net, cfg, tc)
    m = net["mlp"]
    assert m.candidates_A.device.type == "cpu" and m.candidates_A.dtype == torch.float64
    with torch.no_grad():
        m.lora_A.add_(torch.randn(4, 8, dtype=torch.float64))  # "trained" rows, not in the pool
    trained = m.lora_A.detach().clone()
    for _ in range(4):  # slots 0,1 then 2,3, ... : after 4 pairs the pool window is back at the start
        m.switch(2, 0, False, None)
    assert m.selected_A.tolist() == [4, 5, 6, 7]
    assert torch.equal(m.lora_A, trained)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_pools_on_gpu():
    for offload in (True, False):
        model, cfg, tc = wrapped(offload_candidates=offload, device="cuda")
        ref_x = tokens()[:, :-1].cuda()
        before = model(ref_x)[0]
        for _, m in sl.lora_layers(model):
            assert m.candidates_A.device.type == ("cpu" if offload else "cuda") and m.lora_A.is_cuda
            m.switch(2, 5, False, None)
        assert torch.allclose(model(ref_x)[0], before, atol=1e-10, rtol=0)


def test_accumulated_update_reaches_rank_above_r():
    """Regression onto a full-rank target: W + s·B·A − W0 reaches rank > 2r (without switching: <= 2r)."""
    torch.manual_seed(0)
    n, r = 16, 2
    target, x = torch.randn(n, n, dtype=torch.float64), torch.randn(256, n, dtype=torch.float64)
    ranks = {}
    for switch in (True, False):
        net = nn.ModuleDict({"mlp": nn.Linear(n, n, bias=False)}).double()
        w0 = net["mlp"].weight.detach().clone()
        cfg = sl.Config(lora_rank=r, switch_lora=switch, fix_switch_lora_interval=True, switch_lora_interval=10)
        tc = train.TrainConfig(num_training_steps=300, lr=0.05)
        sl.wrap(net, cfg, tc)
        opt = sl.make_optimizer(net, cfg, tc)
        for step in range(300):
            ((net["mlp"](x) - x @ target.t()) ** 2).mean().backward()
            sl.before_step(step, net, opt, cfg, tc)
            opt.step()
            opt.zero_grad()
        sv = torch.linalg.svdvals(net["mlp"].merged_weight().detach() - w0)
        ranks[switch] = int((sv > 1e-6 * sv[0]).sum())
    assert ranks[False] <= 2 * r < ranks[True]


def test_bad_settings_fail_with_one_clear_line(train_run, tmp_path):
    with pytest.raises(ValueError, match="exceeds min"):
        train_run("--method", "switchlora", "--lora_rank", "200", save_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="below 2 x --adam_warm_step"):
        train_run(*FAST, "--switch_lora_interval", "8", save_dir=tmp_path / "b")


def test_resume_is_exact_and_model_pt_is_the_wrapped_model(train_run, tmp_path):
    args = FAST + ["--discontinuous_switch", "--num_training_steps", "6"]
    full = train_run(*args, save_dir=tmp_path / "full")
    assert full["metrics"][-2]["method/switched"] > 0
    train_run(*args, "--stop_at_step", "3", save_dir=tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert cut["step"] == 3 and any(s["frozen_A"].any() for s in cut["method_state"].values())  # frozen at the cut
    train_run(*args, "--autoresume", save_dir=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-6, rtol=0), k
    for name, st in a["method_state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["method_state"][name][k])), (name, k)
    # model.pt is a plain GPT with the same logits as the wrapped model (eval mode)
    plain = load_plain(str(tmp_path / "full" / "model.pt")).eval()
    tc, _, mc = train.parse_args(args)
    torch.manual_seed(0)
    model = GPT(plain.config)
    sl.wrap(model, mc, tc)
    model.load_state_dict(a["model"])
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, plain.config.vocab_size, (2, 32))
    assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5, rtol=0)
    sl.export(model, mc)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # export changes nothing


def test_ddp_two_ranks_agree(torchrun, tmp_path):
    """2-process gloo: --check_ranks_every 1 asserts identical weights after every update (switches included)."""
    proc = torchrun(*FAST, "--discontinuous_switch", "--check_ranks_every", "1", save_dir=tmp_path / "ddp")
    recs = [json.loads(line) for line in open(os.path.join(tmp_path, "ddp", "metrics.jsonl"))]
    assert max(r.get("method/switched", 0) for r in recs) > 0, proc.stdout[-2000:]
