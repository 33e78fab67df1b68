import json

import pytest
import torch

from model import GPT, GPTConfig, adapted_linear_names, count_params_formula, get_config, load_plain, save_plain


@pytest.mark.parametrize("name", ["tiny", "llama_9m", "llama_20m", "llama_35m"])
def test_param_count_matches_closed_formula(name):
    cfg = get_config(name, vocab_size=257)
    model = GPT(cfg)
    assert model.num_params() == count_params_formula(cfg)


def test_preset_sizes_match_the_papers_table():
    # the sizes the papers quote for the original configs (vocabulary 32100, untied)
    for name, millions in (("llama_60m", 58.2), ("llama_130m", 134.3), ("llama_1b", 1339.5), ("llama_7b", 6739.2)):
        assert abs(count_params_formula(get_config(name, 32100)) / 1e6 - millions) < 0.1


def test_tiny_is_about_one_million_params():
    assert 0.8e6 < count_params_formula(get_config("tiny", 257)) < 1.0e6


def test_causality_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(get_config("tiny", 257)).double().eval()
    x = torch.randint(0, 257, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_architecture_llama_conventions():
    model = GPT(get_config("tiny", 257))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None for m in linears)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied
    assert model.norm.eps == 1e-6
    std = torch.cat([m.weight.flatten() for m in linears]).std().item()
    assert abs(std - 0.02) < 0.002
    names = adapted_linear_names(model)
    assert len(names) == 7 * 4 and "lm_head" not in names
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_json_config_in_the_original_format(tmp_path):
    path = tmp_path / "llama_9m.json"
    path.write_text(json.dumps({"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
                                "num_attention_heads": 4, "max_sequence_length": 1024, "vocab_size": 32000}))
    cfg = get_config(str(path), vocab_size=257)
    assert (cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.n_head, cfg.max_seq_len, cfg.vocab_size) == \
        (128, 352, 4, 4, 1024, 257)


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("llama_9000m", 257)
    with pytest.raises(FileNotFoundError):
        get_config(str(tmp_path / "missing.json"), 257)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="lacks the key"):
        get_config(str(bad), 257)


def test_generate_greedy_is_deterministic_and_top_k_sampling_works():
    torch.manual_seed(0)
    model = GPT(get_config("tiny", 257)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 11) and torch.equal(a, b)
    s1 = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    s2 = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


def test_plain_save_and_load_roundtrip(tmp_path):
    cfg = get_config("tiny", 257)
    model = GPT(cfg).eval()
    save_plain(model, cfg, tmp_path / "model.pt")
    again = load_plain(tmp_path / "model.pt").eval()
    x = torch.randint(0, 257, (1, 16))
    assert torch.equal(model(x)[0], again(x)[0])


# ----------------------------------------------------------------------------- JSON config errors


@pytest.mark.parametrize("content, problem", [
    ({"hidden_size": "abc"}, "'hidden_size' must be a positive integer, got \"abc\""),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be a positive integer, got true"),
    ({"intermediate_size": 0}, "'intermediate_size' must be a positive integer, got 0"),
    ({"rms_norm_eps": "1e-5"}, "'rms_norm_eps' must be a positive number"),
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false"),
    ({"num_key_value_heads": 2}, "num_key_value_heads must equal num_attention_heads"),
    ("{hidden_size: 128,", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ("", "is not valid JSON: Expecting value at line 1 column 1"),
    ("[1, 2]", "must hold a JSON object, not list"),
], ids=["string", "bool", "zero", "eps", "tie", "gqa", "garbage", "empty", "list"])
def test_json_config_errors_are_one_line_and_name_the_file(tmp_path, content, problem):
    path = tmp_path / "cfg.json"
    base = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4}
    path.write_text(content if isinstance(content, str) else json.dumps({**base, **content}))
    with pytest.raises(ValueError) as err:
        get_config(str(path), 257)
    msg = str(err.value)
    assert str(path) in msg and problem in msg and "\n" not in msg, msg


def test_json_config_reads_eps_theta_and_tying(tmp_path):
    path = tmp_path / "cfg.json"  # the fields export.py writes to config.json
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000,
                                "tie_word_embeddings": True, "num_key_value_heads": 4}))
    cfg = get_config(str(path), 300)
    assert (cfg.max_seq_len, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings, cfg.vocab_size) == (512, 1e-5, 500000.0, True, 300)


# ----------------------------------------------------------------------------- reference: HF LlamaForCausalLM


def hf_llama_twin(model):
    """transformers' LlamaForCausalLM (SDPA attention, as ours) holding the same weights as GPT `model`."""
    transformers = pytest.importorskip("transformers", reason="the reference tests need transformers (a test-only dependency)")
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, hidden_act="silu",
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"  # eager attention takes its softmax in float32
    hf = transformers.LlamaForCausalLM(hf_cfg).to(next(model.parameters()).dtype).eval()
    sd = {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def random_gpt(dtype=torch.float64, **overrides):
    """A tiny GPT whose every weight matters: random norm gains, weights large enough for the
    nonlinearities, an eps comparable to mean(x^2) and a theta far from the default."""
    cfg = GPTConfig(**{**dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, intermediate_size=48, max_seq_len=64,
                              norm_eps=1e-2, rope_theta=50.0, init_std=0.1), **overrides})
    model = GPT(cfg, seed=3).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_hf_llama_with_the_same_weights(tie):
    """Catches RoPE removed, its sign flipped, theta changed, gate/up swapped, the norms' eps
    changed or ignored, the norms swapped: each moves the logits by far more than 1e-9."""
    model = random_gpt(tie_embeddings=tie)
    hf = hf_llama_twin(model)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x)
        ref = hf(x).logits
    assert ours.dtype == ref.dtype == torch.float64
    assert ref.abs().max() > 0.1  # not a degenerate comparison
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-9, f"GPT and HF LLaMA differ by {diff:.3g}"


def test_top_k_1_sampling_is_greedy_decoding():
    model = GPT(get_config("tiny", 257)).eval()
    prompt = torch.randint(0, 257, (4, 8), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 12, temperature=0)
    for seed in range(3):  # at temperature 2 over ~257 near-equal logits, an unfiltered draw is almost never the argmax
        sampled = model.generate(prompt, 12, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, greedy)


def test_top_k_samples_lie_in_the_top_k():
    model = GPT(get_config("tiny", 257)).eval()
    prompt = torch.randint(0, 257, (256, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top5 = model(prompt)[0][:, -1].topk(5).indices  # (256, 5)
    nxt = model.generate(prompt, 1, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(0))[:, -1]
    assert (nxt[:, None] == top5).any(1).all()
    assert len(set(nxt.tolist())) > 5  # and it does sample: different rows, different top sets


def test_a_meta_build_materialized_layer_by_layer_equals_an_eager_build():
    """train.py builds the GPT on the meta device and materializes it one layer at a time (a method's
    wrap first, the rest after): the same seed gives the same weights, buffers and logits as GPT(cfg, seed),
    whatever the order; another seed gives other weights."""
    import model as model_lib
    cfg = get_config("tiny", 257)
    eager = GPT(cfg, seed=3)
    with torch.device("meta"):
        lazy = GPT(cfg, seed=3)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.plan("cpu", torch.float32)
    for name in reversed(adapted_linear_names(lazy)[:5]):  # a few layers first, in another order, as a wrap would
        assert not model_lib.materialize(lazy, name).weight.is_meta
    assert any(p.is_meta for p in lazy.parameters())
    lazy.materialize()
    assert not any(p.is_meta for p in lazy.parameters()) and not lazy.rope_cos.is_meta
    a, b = eager.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(eager.rope_cos, lazy.rope_cos) and torch.equal(eager.rope_sin, lazy.rope_sin)
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eager(x)[0], lazy(x)[0])
    other = GPT(cfg, seed=4).state_dict()
    assert not torch.equal(other["layers.0.self_attn.q_proj.weight"], a["layers.0.self_attn.q_proj.weight"])


def test_train_build_gives_the_seed_s_model_and_a_warm_start_s_weights(tmp_path):
    """train.build (meta skeleton -> plan -> materialize) equals GPT(cfg, seed) built eagerly, and with
    --warmed_up_model it holds exactly the file's tensors."""
    import train
    tc, method, mc = train.parse_args(["--seed", "5", "--save_dir", str(tmp_path / "a")])
    run = train.build(train.setup(tc, method, mc), 257)
    ref = GPT(get_config("tiny", 257), seed=5).state_dict()
    got = run.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    warm = GPT(get_config("tiny", 257), seed=9)
    save_plain(warm, warm.config, tmp_path / "warm.pt")
    tc, method, mc = train.parse_args(["--seed", "5", "--warmed_up_model", str(tmp_path / "warm.pt"),
                                       "--save_dir", str(tmp_path / "b")])
    got = train.build(train.setup(tc, method, mc), 257).model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in warm.state_dict().items())
