import json

import pytest
import torch

from model import GPT, PRESETS, adapted_linear_names, count_params_formula, get_config, load_plain, save_plain


@pytest.mark.parametrize("name", ["tiny", "llama_9m", "llama_20m", "llama_35m"])
def test_param_count_matches_closed_formula(name):
    cfg = get_config(name, vocab_size=257)
    model = GPT(cfg)
    assert model.num_params() == count_params_formula(cfg)


def test_preset_sizes_match_the_papers_table():
    # METHODS.md §9 (vocabulary 32100): llama_60m 58.2M, llama_130m 134.3M, llama_1b 1339.5M
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
