"""
LoQT: Low-Rank Adapters for Quantized Pretraining.
Sebastian Loeschcke, Mads Toftrup, Michael J. Kastoryano, Serge Belongie, Vésteinn Snæbjarnarson.
NeurIPS 2024, arXiv:2405.16528; official code sebulo/LoQT. Spec: METHODS.md §7 (GaLore: §4).

The idea. Each adapted linear keeps a quantized, frozen full weight Q, a frozen projector P from
the SVD of the gradient, and one small trainable factor B:

    W = deq(Q) + s·B·P    if n ≤ m ("left":  P r×n, B m×r trains, ∂L/∂B = s·G·Pᵀ)
    W = deq(Q) + s·P·B    if n > m ("right": P m×r, B r×n trains, ∂L/∂B = s·Pᵀ·G)

with s = --lora_alpha itself (not α/r) and G = ∂L/∂W. P sits on the smaller side, so B and its
Adam state are r × max(m, n). At refresh steps T_0 = 0 < T_1 < ... (growing gaps) s·ΔW is merged
into Q, Q is requantized, P is recomputed from that step's G, and B is re-initialised so that
deq(Q) + s·ΔW reproduces the merged weight up to the quantization error. Like GaLore, training
walks through gradient subspaces; unlike GaLore, the full weight never exists in 16/32 bits.

Implementation details (§ = METHODS.md):
1. Quantization written here: NF4 (16 N(0,1) quantiles, blocks of 64, absmax scales, two codes
   per byte, optional double quantization of the scales: 8-bit dynamic code, blocks of 256) and
   block-wise int8 (linear 255-level code, blocks of 64). Codes and scales are registered
   buffers: they are the weights, and the checkpoint (4.5 bits per NF4 weight).
2. `DequantLinear`, a custom autograd function, dequantizes Q in the forward and again in the
   backward (nothing m×n is saved); on refresh steps it also accumulates ∂L/∂W = Σ δᵀx in
   float32 into `layer.grad_W` over the micro-steps (§7.1).
3. Refresh steps as `get_proj_update_steps` (§7.2): T_0 = 0, T_1 = τ; static T_{k+1} = T_k + τ;
   linear T_{k+1} = T_k + ⌊τ + k·ψ⌋; exponential T_{k+1} = T_k + τ + ⌊ψ^k⌋.
4. The refresh runs in `after_step` of a refresh step (§7.3): all-reduce G over ranks; merge
   W_fp = deq(Q) + s·ΔW in float32; P = top-r singular vectors of G (float32 SVD; NF4 storage
   optional); K = --compensate_quant_error_iterations rounds of Q_k = quant(C_{k-1}),
   B_k = (W_fp − deq(Q_k))·P⁺/s (left) or P⁺·(W_fp − deq(Q_k))/s (right), C_k = W_fp − s·ΔW_k,
   C_0 = W_fp, keeping the round with the least ‖W_fp − deq(Q_k) − s·ΔW_k‖_F (K = 0: B = 0).
   P, Q and B are broadcast from rank 0, so ranks agree even if SVDs differ in the last bit.
5. --optimizer adam8bit: an 8-bit AdamW written here; moments in blocks of 256 on a dynamic
   (decade-wise) code with float32 absmax. Tensors under 4096 elements and the embeddings and
   lm_head keep float32 state (transformers#14819). State is plain tensors (weights_only loads).
6. B's Adam state at a refresh, --refresh_optimizer_state: keep (the original: moments carry
   over, GaLore-style), reset (m = v = 0, step 0) or project (m ← m·C, v ← v·(C∘C) with
   C = P_old·P_newᵀ, transposed on the right side). Measured on tiny, 150 steps, τ = 25, val loss:
   s 0.5 seed 0: keep 2.300 / reset 2.342 / project 2.230; seed 1: 2.360 / 2.354 / 2.283;
   s 1.0: 2.047 / 2.090 / 2.011. Project wins every time, so it is the default.

Deviations from the official code, and why:
- The original disables the adapter on a refresh step, merges before the forward and zeroes B's
  gradient (B moves by momentum alone). Here the refresh step trains normally and merges after
  optimizer.step(): G = ∂L/∂W is the same at deq(Q) + s·ΔW however W is split, and B keeps its update.
- Merges in float32 (the original merges in bf16); B is never swapped for 1×1 placeholders (the
  Parameter set stays fixed for DDP, USER_NEEDS §2.0.3).
- --max_proj_gap caps the gap between refreshes (the original clamps the step values, which
  stops refreshing once T_k passes it).
- adam8bit keeps √v, not v, on a code without zero: a v rounded to 0 under a non-zero m gives huge
  steps (the "zero-point problem", Li et al. 2023). Not implemented: eigh, CPU offloading,
  per-layer optimizer steps, fp4, 1-bit.

Some warnings:
- A refresh step holds one float32 m×n gradient per adapted layer at once: the memory peak on
  big models (the original offloads it to CPU or steps layer by layer).
- Each requantization loses updates smaller than a quantization step: why the gaps grow.
- s multiplies the adapted weights' effective learning rate (Adam is scale-invariant): s·lr.

Usage:
    python train.py --method loqt                                  # tiny defaults below
    python train.py --method loqt --optimizer adam8bit --use_double_quant
    torchrun --nproc-per-node 2 train.py --method loqt --num_training_steps 20 --check_ranks_every 1
    python train.py --method loqt --model_config llama_350m --lr 0.01 --lora_r 256 --lora_alpha 0.5 \\
        --update_proj_gap 100 --adamw_eps 1e-6 --grad_clipping 0 --refresh_optimizer_state keep  # 350M script

Defaults, paper scripts (lr 0.01) vs here (tiny, lr 3e-3, 500 steps): r 128-256 vs 32; s 0.4-0.5 vs
1.0 (s·lr 5e-3 vs 3e-3); τ 100 vs 50, exponential, ψ 1.2 (10 refreshes in 500 steps); K 5; NF4 W and
P. The original's command-line defaults are static τ 50, K 0, no quantization, s 0.5.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import materialize


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    lora_r: int = opt(32, "r: adapter rank (scripts 128-1024)", aliases=["--rank", "--lora_rank"])
    lora_alpha: float = opt(1.0, "s: scale of the adapter branch, used as is, not alpha/r (scripts 0.25-0.5)")
    update_proj_gap: int = opt(50, "tau: steps to the first refresh and the base gap (scripts 100)")
    proj_gap_progression: str = opt("exponential", "how refresh gaps grow", choices=["static", "linear", "exponential"])
    increment_size: float = opt(1.2, "psi: linear increment or exponential base of the gap growth")
    max_proj_gap: int = opt(0, "cap on the gap between refreshes (0: no cap)")
    compensate_quant_error_iterations: int = opt(5, "K: error-compensation rounds at a refresh (0: plain requantize)")
    quantize_w: str = opt("4bit", "storage of the adapted weights", choices=["4bit", "8bit", "none"])
    quantize_projection_matrix: str = opt("4bit", "storage of the projector P", choices=["4bit", "none"])
    use_double_quant: bool = opt(False, "quantize W's NF4/int8 block scales again (8-bit, block 256)")
    optimizer: str = opt("adamw", "adamw (float32 state) | adam8bit (8-bit block-wise state)", choices=["adamw", "adam8bit"])
    refresh_optimizer_state: str = opt("project", "B's Adam moments at a refresh", choices=["keep", "reset", "project"])


# ----------------------------------------------------------------------------- quantization


def nf4_code():
    """The 16 NF4 levels (QLoRA §3): N(0,1) quantiles, 8 positive and 7 negative ones plus an exact 0, scaled to [-1, 1]."""
    edge = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))  # the outermost quantile: between 2^4 and 2^4-1 equal-mass bins
    pos = torch.special.ndtri(torch.linspace(edge, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(edge, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.max()).float()


def dynamic_code(signed, zero=True):
    """8-bit dynamic code: decade i (values in (10^-i-1, 10^-i]) gets 2^(bits-1-i) linear steps, so
    precision is relative, like a float with a variable-length exponent (Dettmers et al. 2022)."""
    bits = 7 if signed else 8
    mags = torch.cat([10.0 ** -i * torch.linspace(0.1, 1, 2 ** (bits - 1 - i) + 1, dtype=torch.float64)[1:] for i in range(bits)])
    parts = ([-mags] if signed else []) + ([mags.new_zeros(1)] if zero else []) + [mags]
    return torch.cat(parts).sort().values.float()  # signed: 255 levels; unsigned: 256 (255 without the zero)


CODES = {"4bit": nf4_code, "8bit": lambda: torch.arange(-127, 128) / 127.0, "dyn": lambda: dynamic_code(True),
         "dyn+": lambda: dynamic_code(False, zero=False)}
_cache = {}


def code(kind, device):
    if (kind, device) not in _cache:
        _cache[kind, device] = CODES[kind]().to(device)
    return _cache[kind, device]


def quantize_blockwise(x, kind, block):
    """x -> (idx uint8 (numel padded to the block), absmax float32 (blocks,)): idx = nearest level of x / absmax."""
    flat = x.detach().float().flatten()
    flat = F.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    absmax = flat.abs().amax(1)
    c = code(kind, x.device)
    idx = torch.bucketize(flat / absmax.clamp_min(1e-30)[:, None], (c[1:] + c[:-1]) / 2)  # nearest level
    return idx.to(torch.uint8).flatten(), absmax


def dequantize_blockwise(idx, absmax, kind, numel):
    block = idx.numel() // absmax.numel()
    return (code(kind, idx.device)[idx.long()].view(-1, block) * absmax[:, None]).flatten()[:numel]


def pack4(idx):
    """Two 4-bit codes per byte: (2k,) values < 16 -> (k,) bytes, the first code in the high nibble."""
    return idx[0::2] << 4 | idx[1::2]


def unpack4(packed):
    return torch.stack([packed >> 4, packed & 15], 1).flatten()


class QuantizedTensor(nn.Module):
    """A frozen tensor kept as codes and scales in buffers ("4bit" NF4, "8bit" int8, or "none": float32).

    Buffers keep their shapes forever, so re-quantization copies in place and checkpoints load."""

    def __init__(self, x, kind, double_quant=False, block=64):
        super().__init__()
        self.kind, self.shape, self.numel, self.block = kind, tuple(x.shape), x.numel(), block
        self.double_quant = double_quant and kind != "none"
        for name, t in self.encode(x).items():
            self.register_buffer(name, t)

    def encode(self, x):
        if self.kind == "none":
            return {"data": x.detach().float().clone()}
        idx, absmax = quantize_blockwise(x, self.kind, self.block)
        out = {"codes": pack4(idx) if self.kind == "4bit" else idx}
        if not self.double_quant:
            return {**out, "absmax": absmax}
        offset = absmax.mean()  # QLoRA: scales are positive, so centre them before the signed 8-bit code
        idx2, absmax2 = quantize_blockwise(absmax - offset, "dyn", 256)
        return {**out, "absmax_codes": idx2, "absmax_scale": absmax2, "absmax_offset": offset}

    def decode(self, enc):
        if self.kind == "none":
            return enc["data"]
        idx = unpack4(enc["codes"]) if self.kind == "4bit" else enc["codes"]
        absmax = enc.get("absmax")
        if absmax is None:
            nblocks = idx.numel() // self.block
            absmax = dequantize_blockwise(enc["absmax_codes"], enc["absmax_scale"], "dyn", nblocks) + enc["absmax_offset"]
        return dequantize_blockwise(idx, absmax, self.kind, self.numel).view(self.shape)

    def dequantize(self):
        return self.decode(dict(self.named_buffers()))

    @torch.no_grad()
    def load_(self, enc):
        for name, t in self.named_buffers():
            t.copy_(enc[name])


# ----------------------------------------------------------------------------- the layer


class DequantLinear(torch.autograd.Function):
    """y = x·deq(Q)ᵀ. Backward: ∂L/∂x = δ·deq(Q); on refresh steps also grad_W += δᵀx (float32)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.save_for_backward(x if layer.grad_W is not None else None)  # x is kept only when dL/dW is wanted
        return F.linear(x, layer.W.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        layer, (x,) = ctx.layer, ctx.saved_tensors
        if x is not None:  # G = Σ_tokens δ xᵀ, (m, n)
            layer.grad_W += gy.reshape(-1, gy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        gx = gy @ layer.W.dequantize().to(gy.dtype) if ctx.needs_input_grad[0] else None
        return (gx.to(ctx.x_dtype) if gx is not None else None), None


class LoQTLinear(nn.Module):
    """W = deq(Q) + s·B·P (left, n ≤ m) or deq(Q) + s·P·B (right): Q and P frozen buffers, B trains."""

    def __init__(self, linear, cfg):
        super().__init__()
        m, n, r = linear.out_features, linear.in_features, cfg.lora_r
        self.s, self.r, self.left = cfg.lora_alpha, r, n <= m  # P on the smaller side
        w = linear.weight.detach()
        self.W = QuantizedTensor(w, cfg.quantize_w, cfg.use_double_quant)  # Q
        self.P = QuantizedTensor(w.new_zeros((r, n) if self.left else (m, r)), cfg.quantize_projection_matrix)
        self.B = nn.Parameter(w.new_zeros((m, r) if self.left else (r, n)).float())
        self.bias = linear.bias
        self.grad_W = None  # float32 (m, n) while a refresh step accumulates ∂L/∂W, else None

    def delta(self):
        """ΔW = B·P (left) or P·B (right), float32, (m, n)."""
        P = self.P.dequantize()
        return self.B.float() @ P if self.left else P @ self.B.float()

    def merged_weight(self):
        return self.W.dequantize() + self.s * self.delta()

    def forward(self, x):
        if self.grad_W is not None and not x.requires_grad:  # no backward node means no dL/dW (USER_NEEDS §1.7)
            x = x.detach().requires_grad_()
        P, B = self.P.dequantize().to(x.dtype), self.B.to(x.dtype)
        y = DequantLinear.apply(x, self)
        low = F.linear(F.linear(x, P), B) if self.left else F.linear(F.linear(x, B), P)  # (…, m)
        y = y + self.s * low
        return y if self.bias is None else y + self.bias


def loqt_layers(model):
    return [m for m in model.modules() if isinstance(m, LoQTLinear)]


def wrap(model, cfg, train=None):
    """Replace every attn/mlp nn.Linear by a LoQTLinear; embeddings, norms and lm_head stay full-rank and trainable."""
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0 or cfg.update_proj_gap < 1 or cfg.increment_size < 0:
        raise ValueError("--lora_r, --lora_alpha and --update_proj_gap must be positive and --increment_size >= 0")
    if cfg.compensate_quant_error_iterations < 0 or cfg.max_proj_gap < 0:
        raise ValueError("--compensate_quant_error_iterations and --max_proj_gap must be >= 0")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and ("attn" in n or "attention" in n or "mlp" in n)]
    for name in names:
        lin = materialize(model, name)  # real weights for this layer only: the float32 model never exists
        if cfg.lora_r > min(lin.in_features, lin.out_features):
            raise ValueError(f"--lora_r {cfg.lora_r} exceeds the smaller side of {name} "
                             f"({lin.out_features}x{lin.in_features})")
        parent, child = name.rpartition(".")[::2]
        setattr(model.get_submodule(parent), child, LoQTLinear(lin, cfg))
    return model


def export(model, cfg):
    """A plain GPT state dict: every LoQTLinear becomes `<name>.weight` = deq(Q) + s·ΔW (model untouched)."""
    sd = model.state_dict()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, LoQTLinear):
                sd = {k: v for k, v in sd.items() if not k.startswith(name + ".")}
                sd[name + ".weight"] = mod.merged_weight().detach().clone()
                if mod.bias is not None:
                    sd[name + ".bias"] = mod.bias.detach().clone()
    return sd


# ----------------------------------------------------------------------------- 8-bit Adam


def get_moments(st):
    """(m, v) in float32 from an Adam state: float32 tensors themselves, or decoded 8-bit blocks."""
    if "exp_avg" in st:
        return st["exp_avg"], st["exp_avg_sq"]
    m = dequantize_blockwise(st["m_codes"], st["m_absmax"], "dyn", st["numel"])
    return m, dequantize_blockwise(st["v_codes"], st["v_absmax"], "dyn+", st["numel"]).square()


def set_moments(st, m, v):
    if "exp_avg" in st:
        st["exp_avg"].copy_(m.view_as(st["exp_avg"]))
        st["exp_avg_sq"].copy_(v.view_as(st["exp_avg_sq"]))
        return
    st["m_codes"], st["m_absmax"] = quantize_blockwise(m, "dyn", 256)
    st["v_codes"], st["v_absmax"] = quantize_blockwise(v.sqrt(), "dyn+", 256)  # √v: no zero point (Li et al. 2023)


class Adam8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments live in 8-bit blocks of 256 with float32 absmax.

    A parameter keeps float32 state when it has fewer than `min_8bit_size` elements or its group
    says bits=32 (embeddings and lm_head, as bitsandbytes users are told to do)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, min_8bit_size=4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=8))
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            (b1, b2), lr = g["betas"], g["lr"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    if g["bits"] == 8 and p.numel() >= self.min_8bit_size:
                        st["numel"] = p.numel()
                        set_moments(st, torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
                    else:
                        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                t, grad = st["step"].item(), p.grad.float().flatten()
                m, v = (x.flatten() for x in get_moments(st))
                m.mul_(b1).add_(grad, alpha=1 - b1)  # m ← β1·m + (1−β1)·g
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)  # v ← β2·v + (1−β2)·g²
                p.mul_(1 - lr * g["weight_decay"])
                denom = (v / (1 - b2 ** t)).sqrt_().add_(g["eps"])
                p.addcdiv_((m / (1 - b1 ** t)).view_as(p), denom.view_as(p), value=-lr)
                if "exp_avg" not in st:
                    set_moments(st, m, v)
        return None


def make_optimizer(model, cfg, train):
    """Groups: adapter factors and other matrices (weight decay), embeddings/lm_head (bits=32), vectors (no decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    full = lambda n: "embed" in n or "lm_head" in n  # noqa: E731
    groups = [{"params": [p for n, p in named if p.dim() >= 2 and not full(n)], "weight_decay": train.weight_decay},
              {"params": [p for n, p in named if p.dim() >= 2 and full(n)], "weight_decay": train.weight_decay, "bits": 32},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    return Adam8bit(groups, **kw) if cfg.optimizer == "adam8bit" else torch.optim.AdamW(groups, **kw)


# ----------------------------------------------------------------------------- the refresh event


def refresh_steps(cfg, num_training_steps):
    """T_0 = 0, T_1 = τ, then gaps per --proj_gap_progression (METHODS.md §7.2); steps ≤ num_training_steps."""
    tau, psi, steps, t, k = cfg.update_proj_gap, cfg.increment_size, [0], cfg.update_proj_gap, 0
    while t <= num_training_steps:
        steps.append(t)
        k += 1
        gap = {"static": tau, "linear": int(tau + k * psi), "exponential": tau + int(psi ** k)}[cfg.proj_gap_progression]
        t += min(gap, cfg.max_proj_gap) if cfg.max_proj_gap else gap
    return steps


def step_start(step, model, cfg, train):
    """On a refresh step, every layer starts accumulating ∂L/∂W (float32) over this update's micro-steps."""
    if step in refresh_steps(cfg, train.num_training_steps):
        for layer in loqt_layers(model):
            layer.grad_W = torch.zeros(layer.W.shape, device=layer.B.device)


@torch.no_grad()
def compensated_init(layer, W_fp, K):
    """Q and B with deq(Q) + s·ΔW ≈ W_fp (§7.3): K rounds of LoftQ-style alternation, keep the best round.

    Returns (error of the kept round, error of plain requantization), both ‖W_fp − deq(Q) − s·ΔW‖_F."""
    s, P = layer.s, layer.P.dequantize()
    P_pinv = torch.linalg.pinv(P)  # P⁺ (n×r left, r×m right); = Pᵀ when P is orthonormal and unquantized
    C, best, err0 = W_fp, None, None
    for _ in range(max(K, 1)):
        enc = layer.W.encode(C)  # Q_k = quant(C_{k-1})
        R = W_fp - layer.W.decode(enc)  # R_k = W_fp − deq(Q_k)
        err0 = R.norm().item() if err0 is None else err0
        if K == 0 or layer.W.kind == "none":
            best = (0.0 if layer.W.kind == "none" else err0, enc, torch.zeros_like(layer.B))
            break
        B = R @ P_pinv / s if layer.left else P_pinv @ R / s  # B_k = R_k·P⁺/s  or  P⁺·R_k/s
        dW = s * (B @ P if layer.left else P @ B)
        err = (R - dW).norm().item()  # e_k = ‖W_fp − (deq(Q_k) + s·ΔW_k)‖_F
        if best is None or err < best[0]:
            best = (err, enc, B)
        C = W_fp - dW  # C_k = W_fp − s·ΔW_k
    layer.W.load_(best[1])
    layer.B.copy_(best[2])
    return best[0], err0


@torch.no_grad()
def adjust_optimizer_state(layer, optimizer, how, P_old, P_new):
    """Adam moments of B after P changed: keep, reset (m = v = 0, step 0) or project onto the new basis."""
    st = optimizer.state.get(layer.B)
    if how == "keep" or not st:
        return
    m, v = get_moments(st)
    if how == "reset":
        st["step"].zero_()
        m, v = torch.zeros_like(m), torch.zeros_like(v)
    else:  # coordinates of old rows/columns of P in the new ones: C = P_old·P_newᵀ (left, r×r)
        C = P_old @ P_new.T if layer.left else P_new.T @ P_old
        m, v = m.view(layer.B.shape), v.view(layer.B.shape)
        m, v = (m @ C, v @ C.square()) if layer.left else (C @ m, C.square() @ v)
    set_moments(st, m, v)


@torch.no_grad()
def after_step(step, model, optimizer, cfg, train):
    """Refresh: merge s·ΔW into Q, new P from SVD(G), error-compensated Q and B, Adam state of B."""
    layers = [l for l in loqt_layers(model) if l.grad_W is not None]
    if not layers:
        return {}
    ddp = dist.is_available() and dist.is_initialized()
    errs, errs0 = [], []
    for layer in layers:
        G, layer.grad_W = layer.grad_W, None
        if ddp:  # DDP reduces parameter grads only; G is ours to average (SUM: gloo has no AVG)
            dist.all_reduce(G)
            G /= dist.get_world_size()
        W_fp = layer.merged_weight()  # W_fp = deq(Q) + s·ΔW, float32
        P_old = layer.P.dequantize().clone()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)  # float32 SVD of the full gradient
        layer.P.load_(layer.P.encode(Vh[:layer.r] if layer.left else U[:, :layer.r]))  # left: top-r right vectors
        for t in layer.P.buffers() if ddp else []:  # rank 0's P everywhere, even if SVDs differ in the last bit
            dist.broadcast(t, 0)
        err, err0 = compensated_init(layer, W_fp, cfg.compensate_quant_error_iterations)
        for t in [*layer.W.buffers(), layer.B.data] if ddp else []:
            dist.broadcast(t, 0)
        adjust_optimizer_state(layer, optimizer, cfg.refresh_optimizer_state, P_old, layer.P.dequantize())
        errs.append(err / (W_fp.norm().item() + 1e-30))
        errs0.append(err0 / (W_fp.norm().item() + 1e-30))
    return {"refresh": 1.0, "quant_err": sum(errs) / len(errs), "quant_err_uncompensated": sum(errs0) / len(errs0)}
