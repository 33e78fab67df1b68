"""
A LLaMA-style GPT language model, all of it in this one file.

This is the model the five low-rank pre-training papers train (ReLoRA, SwitchLoRA, GaLore/GoLore,
LoQT all train a copy of Hugging Face's LLaMA modelling file, `modeling_llama.py`):
  - RMSNorm (eps 1e-6) before attention and before the MLP, and once more before the head
  - rotary position embeddings (RoPE) on queries and keys
  - causal attention through F.scaled_dot_product_attention
  - SwiGLU MLP: down(silu(gate(x)) * up(x))
  - no biases in any linear layer; input embedding and lm_head untied by default
  - every Linear and Embedding initialised N(0, 0.02)

Module names follow the HF LLaMA names (`layers.3.self_attn.q_proj`, `layers.3.mlp.gate_proj`),
so a method finds its target layers the way the original repos do: every nn.Linear whose name
contains "attn" or "mlp" (`adapted_linear_names` below). `lm_head` is deliberately not matched.

    from model import GPT, get_config
    model = GPT(get_config("tiny", vocab_size=257))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
"""

import json
import os
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in float32 (as HF LLaMA does)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(seq_len, head_dim, theta=10000.0):
    """cos/sin tables of shape (seq_len, head_dim) for rotary embeddings (HF 'rotate_half' layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, nh, T, hd). Rotates pairs (i, i + hd/2) by the position angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hd)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class GPTConfig:
    vocab_size: int = 257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 352
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02  # initializer_range
    tie_embeddings: bool = False


# (hidden h, intermediate f, layers L, heads, max_seq_len): the configs/*.json of the original repos
# (Guitaricet/relora, jiaweizzhao/GaLore; llama_13b from sebulo/LoQT)
PRESETS = {
    "tiny": (128, 352, 4, 4, 256),  # ~0.87M params with the 257-token byte vocabulary: the CPU default
    "llama_9m": (128, 352, 4, 4, 1024),
    "llama_20m": (256, 688, 4, 4, 1024),
    "llama_35m": (384, 1024, 6, 8, 1024),
    "llama_40m": (416, 1024, 8, 8, 1024),
    "llama_60m": (512, 1376, 8, 8, 1024),
    "llama_71m": (512, 1368, 12, 8, 1024),
    "llama_100m": (640, 1708, 12, 10, 1024),
    "llama_130m": (768, 2048, 12, 12, 1024),
    "llama_250m": (768, 2560, 24, 16, 1024),
    "llama_350m": (1024, 2736, 24, 16, 1024),
    "llama_1b": (2048, 5461, 24, 32, 1024),
    "llama_3b": (2560, 6848, 32, 32, 1024),
    "llama_7b": (4096, 11008, 32, 32, 2048),
    "llama_13b": (5120, 13824, 40, 40, 2048),  # LoQT's configs only
}


def get_config(name_or_path, vocab_size):
    """A preset name or a JSON file in the original repos' (HF LlamaConfig) format.

    The vocabulary always comes from the tokenizer; a JSON's own `vocab_size` is ignored (the
    originals' 32000/32100 belong to the T5 tokenizer, which this project does not use). A JSON may
    also set rms_norm_eps, rope_theta and tie_word_embeddings (the config.json export.py writes)."""
    extra = {}
    if name_or_path in PRESETS:
        h, f, n_layer, n_head, seq = PRESETS[name_or_path]
    elif name_or_path.endswith(".json"):
        js, where = read_json_config(name_or_path), f"model config {name_or_path}"
        get = lambda key, kind, default=None: checked(js, key, kind, where, default)  # noqa: E731
        h, f = get("hidden_size", int), get("intermediate_size", int)
        n_layer, n_head = get("num_hidden_layers", int), get("num_attention_heads", int)
        seq = get("max_sequence_length", int, get("max_position_embeddings", int, 1024))
        if get("num_key_value_heads", int, n_head) != n_head:
            raise ValueError(f"{where}: num_key_value_heads must equal num_attention_heads (no grouped-query attention here)")
        extra = dict(norm_eps=get("rms_norm_eps", float, 1e-6), rope_theta=get("rope_theta", float, 10000.0),
                     tie_embeddings=get("tie_word_embeddings", bool, False))
    else:
        raise ValueError(f"unknown model config '{name_or_path}'; presets: {', '.join(PRESETS)}, or a .json file")
    if h % n_head or (h // n_head) % 2:
        where = "" if name_or_path in PRESETS else f" (model config {name_or_path})"
        raise ValueError(f"hidden size {h} must split into {n_head} heads of even size{where}")
    return GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=h,
                     intermediate_size=f, max_seq_len=seq, **extra)


def read_json_config(path):
    """The JSON object in `path`; every problem is one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            js = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {path} cannot be read ({type(e).__name__})") from None
    if not isinstance(js, dict):
        raise ValueError(f"model config {path} must hold a JSON object, not {type(js).__name__}")
    return js


def checked(js, key, kind, where, default=None):
    """js[key] as a positive int, a positive float or a bool (`kind`); one-line ValueError otherwise."""
    if key not in js:
        if default is None:
            raise ValueError(f"{where} lacks the key '{key}'")
        return default
    v = js[key]
    ok = isinstance(v, bool) if kind is bool else (
        not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else int) and v > 0)
    if not ok:
        what = {int: "a positive integer", float: "a positive number", bool: "true or false"}[kind]
        raise ValueError(f"{where}: '{key}' must be {what}, got {json.dumps(v)}")
    return kind(v)


class GPT(nn.Module):
    """The model. `seed` fixes the initial weights: each tensor is drawn from its own generator,
    seeded by (seed, tensor name), so the init does not depend on the order in which tensors are
    created, on the device, or on whether the model was first built on the meta device.

    `activation_checkpointing` (a plain attribute, off by default; train.py's flag sets it): in a
    training forward with grad enabled each Block runs under torch.utils.checkpoint (non-reentrant,
    RNG state preserved), so autograd keeps only the blocks' inputs and the backward reruns each
    block's forward, with the same dropout masks, just before its own backward. Whatever a method
    put inside the blocks is recomputed too: that is safe because no method's forward changes state
    (their events and gradient hooks run outside the forward or in the backward, which runs once)."""

    activation_checkpointing = False

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.config, self.seed = cfg, seed
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.n_embd // cfg.n_head, cfg.rope_theta)
        # not persistent: recomputed from the config, so they never bloat checkpoints
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._plan = None  # where materialize() puts the tensors of a meta-built model
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not p.is_meta:
                    p.copy_(self.initial_value(name))

    def initial_value(self, name):
        """The initial value of parameter `name` (CPU, float32): N(0, init_std) for every Linear and
        Embedding weight (HF LLaMA's initializer_range), ones for the RMSNorm gains."""
        shape = self.get_parameter(name).shape
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape).normal_(0.0, self.config.init_std, generator=g)

    # --- building a big model one layer at a time

    def plan(self, device, dtype=torch.float32, weights=None):
        """For a model built on the meta device (`with torch.device("meta"): GPT(cfg)`, which allocates
        nothing): materialize() will put its tensors on `device` in `dtype`, with values from
        `weights` (a plain state dict: a warm start) or, if None, the seed's init."""
        self._plan = None if device is None else (torch.device(device), dtype, weights)
        return self

    @torch.no_grad()
    def materialize(self, name=""):
        """Submodule `name` ("" = the whole model) with real tensors, created now, one at a time.

        A method's wrap() calls this on each layer just before replacing it, so at most one layer
        exists in full precision at a time: a quantizing method never holds the float32 model. On a
        model built normally (no meta tensors) it just returns the submodule."""
        module = self.get_submodule(name)
        if self._plan is None:
            return module
        device, dtype, weights = self._plan
        prefix = name + "." if name else ""
        for sub_name, sub in module.named_modules(prefix=prefix.rstrip(".")):
            for key, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    full = f"{sub_name}.{key}" if sub_name else key
                    value = weights[full] if weights is not None else self.initial_value(full)
                    sub._parameters[key] = nn.Parameter(value.to(device, dtype), requires_grad=p.requires_grad)
        if not name and self.rope_cos.is_meta:  # the rotary tables are computed, not stored
            cos, sin = rope_cache(self.config.max_seq_len, self.config.n_embd // self.config.n_head, self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        if not name and self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        return module

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)  # (B, T, C)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:  # keep only the block's input; its forward runs again in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - self.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after the prompt idx (B, T); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.max_seq_len:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


def materialize(model, name):
    """model.get_submodule(name) with real tensors: a GPT built on the meta device creates that layer
    now (GPT.materialize); any other module is returned as it is."""
    return model.materialize(name) if isinstance(model, GPT) else model.get_submodule(name)


def adapted_linear_names(model):
    """Names of the linears the original repos adapt: every nn.Linear whose name has attn/mlp."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ("attn" in n or "attention" in n or "mlp" in n)]


def count_params_formula(cfg: GPTConfig):
    """Closed form: L·(4h² + 3h·f + 2h) + 2·V·h + h (untied; + V·h fewer when tied)."""
    h, f, L, V = cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.vocab_size
    return L * (4 * h * h + 3 * h * f + 2 * h) + (1 if cfg.tie_embeddings else 2) * V * h + h


def load_plain(path, map_location="cpu"):
    """Load a `model.pt` written by train.py: {'config': dict, 'model': state_dict} -> GPT."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    model = GPT(GPTConfig(**obj["config"]))
    model.load_state_dict(obj["model"])
    return model


def save_plain(model_or_state, config: GPTConfig, path, **extra):
    """model.pt: {'config': dict, 'model': state dict on the CPU, **extra} (train.py adds `steps`)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    torch.save({"config": asdict(config), "model": {k: v.detach().cpu() for k, v in sd.items()}, **extra}, path)


if __name__ == "__main__":
    for name in PRESETS:
        cfg = get_config(name, vocab_size=32000)
        print(f"{name:12s} {count_params_formula(cfg) / 1e6:8.1f}M params (vocab 32000)")
