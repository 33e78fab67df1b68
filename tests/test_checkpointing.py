"""--activation_checkpointing: each Block under torch.utils.checkpoint (non-reentrant, RNG replayed).

Why bit-for-bit equality is expected, not just float32 closeness: a non-reentrant checkpoint keeps
the forward's autograd graph as it is and only swaps where its saved tensors come from (kept vs
recomputed in the backward). The recomputation runs the same ops on the same inputs with the same
RNG state (preserve_rng_state=True), so the saved tensors, and hence every gradient, optimizer step
and method event (ReLoRA's merges, SwitchLoRA's switches, GoLore's projections, LTE's merges,
LoQT's refreshes), are identical to the bit on a deterministic CPU.
"""

import pytest
import torch

import relora
import train
from model import GPT, get_config

pytestmark = pytest.mark.usefixtures("one_thread")

# each with its periodic event inside the 4 TINY updates, and dropout on where the method has it
METHOD_ARGS = {
    "full": [],
    "relora": ["--relora", "2", "--scheduler", "cosine_restarts", "--restart_warmup_steps", "1", "--lora_r", "8",
               "--lora_dropout", "0.1"],
    "switchlora": ["--lora_rank", "8", "--fix_switch_lora_interval", "--switch_lora_interval", "10",
                   "--discontinuous_switch", "--lora_dropout", "0.1"],
    "golore": ["--rank", "8", "--update_proj_gap", "2", "--rand_ratio", "0.5"],
    "lte": ["--num_heads", "2", "--lora_r", "4", "--merge_iter", "2"],
    "loqt": ["--update_proj_gap", "2", "--proj_gap_progression", "static", "--lora_r", "8"],
}
EVENTS = {"relora": "method/relora_merges", "switchlora": "method/switched", "golore": "method/proj_random"}


def assert_same_runs(a, b, tmp_path):
    la = [(r["step"], r["loss"]) for r in a["metrics"] if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in b["metrics"] if "loss" in r]
    assert la == lb and len(la) >= 4
    assert a["summary"]["val_loss"] == b["summary"]["val_loss"]
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("plain", "ckpt"))
    assert ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_same_losses_and_weights_with_checkpointing(train_run, tmp_path, method):
    args = ["--method", method, *METHOD_ARGS[method]]
    a = train_run(*args, save_dir=tmp_path / "plain")
    b = train_run(*args, "--activation_checkpointing", save_dir=tmp_path / "ckpt")
    if method in EVENTS:  # the periodic event did happen in these 4 updates
        assert any(r.get(EVENTS[method]) for r in a["metrics"]), method
    assert_same_runs(a, b, tmp_path)


@pytest.mark.parametrize("method", ["relora", "switchlora", "golore", "loqt"])
def test_per_layer_updates_with_checkpointing(train_run, tmp_path, method):
    """Gradient hooks (post-accumulate steps, GoLore's/LoQT's projections in the backward,
    SwitchLoRA's held factor gradient) fire once per real backward, never in the recomputation."""
    args = ["--method", method, *METHOD_ARGS[method], "--per_layer_updates", "--grad_clipping", "0"]
    a = train_run(*args, save_dir=tmp_path / "plain")
    b = train_run(*args, "--activation_checkpointing", save_dir=tmp_path / "ckpt")
    assert_same_runs(a, b, tmp_path)


def relora_model(seed=0):
    """tiny with ReLoRA adapters (dropout 0.1) whose B is nonzero, so the dropout mask reaches the loss."""
    model = GPT(get_config("tiny", 257), seed=seed)
    relora.wrap(model, relora.Config(lora_r=8, lora_dropout=0.1), train.TrainConfig(seed=seed))
    with torch.no_grad():
        for m in (m for m in model.modules() if isinstance(m, relora.ReLoRALinear)):
            m.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model.train()


def saved_bytes_and_grads(model, checkpointing, x):
    """One forward and backward: the bytes autograd saves outside any checkpoint, the loss, the grads."""
    model.activation_checkpointing = checkpointing
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(123)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(saved), loss.detach(), grads


def test_gradients_equal_and_activations_dropped_on_the_raw_model():
    model = relora_model()
    x = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(0))
    kept, loss_a, ga = saved_bytes_and_grads(model, False, x)
    dropped, loss_b, gb = saved_bytes_and_grads(model, True, x)
    assert torch.equal(loss_a, loss_b)
    assert ga.keys() == gb.keys() and any("lora_A" in k for k in ga)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    # outside the checkpoints autograd keeps only each block's input, the head and the loss
    assert dropped < 0.35 * kept, (dropped, kept)
    # another seed gives other dropout masks: the equality above is not vacuous
    torch.manual_seed(7)
    _, loss_c = model(x[:, :-1], x[:, 1:])
    assert not torch.equal(loss_a, loss_c.detach())


def test_off_in_eval_and_under_no_grad():
    model = relora_model()
    model.activation_checkpointing = True
    x = torch.randint(0, 257, (2, 17))
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or orig(*a, **k)
        with torch.no_grad():
            model(x)
        model.eval()(x)
        assert calls == []
        model.train()(x)
        assert len(calls) == model.config.n_layer
    finally:
        torch.utils.checkpoint.checkpoint = orig


@pytest.mark.slow
def test_compile_with_checkpointing(train_run, tmp_path):
    """torch.compile traces the checkpointed blocks (about 1.5 minutes of compiling on a shared CPU)."""
    args = ["--num_training_steps", "2", "--eval_every", "0", "--log_every", "1"]
    a = train_run(*args, "--compile", "--activation_checkpointing", save_dir=tmp_path / "ckpt")
    b = train_run(*args, save_dir=tmp_path / "plain")
    la = [r["loss"] for r in a["metrics"] if "loss" in r]
    lb = [r["loss"] for r in b["metrics"] if "loss" in r]
    # compiled kernels fuse and reorder float32 ops: equal to rounding, not to the bit
    assert len(la) == 2 and all(abs(p - q) < 1e-4 for p, q in zip(la, lb)), (la, lb)
