"""
LoQT: Low-Rank Adapters for Quantized Pretraining.
Sebastian Loeschcke, Mads Toftrup, Michael J. Kastoryano, Serge Belongie, Vésteinn Snæbjarnarson.
NeurIPS 2024, arXiv:2405.16528; official code github.com/sebulo/LoQT. The projector is GaLore's
(arXiv:2403.03507), the 4-bit code QLoRA's NF4 (arXiv:2305.14314).

The idea. Each adapted linear keeps a quantized, frozen full weight Q, a frozen projector P from
the SVD of the gradient, and one small trainable factor B:

    W = deq(Q) + s·B·P    if n ≤ m ("left":  P r×n, B m×r trains, ∂L/∂B = s·G·Pᵀ)
    W = deq(Q) + s·P·B    if n > m ("right": P m×r, B r×n trains, ∂L/∂B = s·Pᵀ·G)

with s = --lora_alpha itself (not α/r) and G = ∂L/∂W. P sits on the smaller side, so B and its
Adam state are r × max(m, n). At refresh steps T_0 = 0 < T_1 < ... (growing gaps) s·ΔW is merged
into Q, Q is requantized, P is recomputed from that step's G, and B is re-initialised so that
deq(Q) + s·ΔW reproduces the merged weight up to the quantization error. Like GaLore, training
walks through gradient subspaces; unlike GaLore, the full weight never exists in 16/32 bits.

Implementation details:
1. Quantization written here: NF4 (16 N(0,1) quantiles, blocks of 64, absmax scales, two codes
   per byte, optional double quantization of the scales: 8-bit dynamic code, blocks of 256) and
   block-wise int8 (linear 255-level code, blocks of 64). Codes and scales are registered
   buffers: they are the weights, and the checkpoint (4.5 bits per NF4 weight). A packed byte
   is decoded by looking up its pair of levels.
2. One autograd function per layer (`LoQTMatmul`) computes y = x·deq(Q)ᵀ + s·x·ΔWᵀ and, in the
   backward, ∂L/∂x and ∂L/∂B; deq(Q) and deq(P) are recomputed there (nothing m×n is saved). On
   a refresh step the same backward also forms G = Σ δᵀx (float32; the original accumulates it in
   a "weight_grad" side buffer, since an NF4 weight has no .grad). That backward is the one place
   where a layer's full-weight gradient is complete (on the last micro-step), so the projection is
   made right there and G is dropped (detail 4), before B's gradient, and any hook on it, exists.
3. Refresh steps as the original's `get_proj_update_steps`: T_0 = 0, T_1 = τ; static
   T_{k+1} = T_k + τ; exponential T_{k+1} = T_k + τ + ⌊ψ^k⌋; linear T_{k+1} = T_k + ⌊g_k⌋ with
   g_k = g_{k-1} + ψ summed in floating point from g_0 = τ, as the original (for τ 100, ψ 1.2
   every fifth gap from k = 35 on is one step shorter than ⌊τ + k·ψ⌋). Only the chosen
   progression is evaluated, once per run.
4. A layer's refresh, in two parts. (a) `project`, in the layer's backward on the last micro-step
   (detail 2): all-reduce G over ranks; P = top-r singular vectors of G (float32 SVD; left: the
   top-r right singular vectors as rows, right: the top-r left ones as columns; NF4 storage
   optional), kept encoded in `layer.pending` (r·min(m, n) codes) while Q, P and B stay as they
   are; G and the SVD factors are freed. (b) `merge`, after B's optimizer step: load the new P;
   merge W_fp = deq(Q) + s·B·P_old in float32; K = --compensate_quant_error_iterations rounds of
   Q_k = quant(C_{k-1}), B_k = (W_fp − deq(Q_k))·P⁺/s (left) or P⁺·(W_fp − deq(Q_k))/s (right),
   C_k = W_fp − s·ΔW_k, C_0 = W_fp, keeping the round with the least ‖W_fp − deq(Q_k) − s·ΔW_k‖_F
   (K = 0: B = 0). The choice is a torch.where, not a Python branch, so the refresh also runs on
   fake tensors (memory.py); metrics are 0-dim tensors. P, Q and B are broadcast from rank 0, so
   ranks agree even if SVDs differ in the last bit. Layers merge one after another: besides W_fp,
   a merge holds at most three more m×n float32 buffers of one layer. The SVD needs nothing of
   B's step, and the merge nothing of G: this split is the old refresh (everything after B's
   step) to the bit (a test runs both), with one layer's G in memory at a time instead of all.
   G is not an optimizer gradient: gradient clipping never sees it (it clips B and the full-rank
   parameters); under float16 it comes from the scaled loss (the SVD does not care).
5. --optimizer adam8bit: an 8-bit AdamW written here; moments in blocks of 256 on a dynamic
   (decade-wise) code with float32 absmax. Tensors under 4096 elements keep float32 state, and so
   do the embeddings and lm_head unless --adam8bit_embeddings (8-bit state on the embedding was
   reported unstable for pre-training, transformers#14819; bitsandbytes itself, which the
   original uses, quantizes every tensor of 4096+ elements). State is plain tensors
   (weights_only loads); a resume restores each state tensor in its saved dtype (torch's loader
   would cast the uint8 codes to the parameter's float dtype).
6. B's Adam state at a refresh, --refresh_optimizer_state: keep (the original: moments carry
   over, GaLore-style), reset (m = v = 0, step 0) or project (m ← m·C, v ← v·(C∘C) with
   C = P_old·P_newᵀ, transposed on the right side). Measured on tiny, 150 steps, τ = 25, val loss:
   s 0.5 seed 0: keep 2.300 / reset 2.342 / project 2.230; seed 1: 2.360 / 2.354 / 2.283;
   s 1.0: 2.047 / 2.090 / 2.011. Project wins every time, so it is the default.

Memory modes (the paper's abstract: 7B on a 24 GB GPU, 13B with per-layer gradient updates):
- Every mode: a layer's G lives only inside that layer's backward on the last micro-step of a
  refresh step (detail 2), so one m×n float32 G and its SVD factors exist at a time, whatever the
  depth; what outlives the backward is each layer's encoded new P until the merge (r·min(m, n)
  NF4 codes: 0.5 GiB at 7B, r 1024). Before this, the ordinary step kept every layer's G until
  after the optimizer step: 24 GiB at 7B, the peak (41.03 GiB; now 17.40, table below).
- Gradient accumulation (k micro-steps, G = Σ over them): the SVD is not linear, so G has to be
  summed in full first; no r-dimensional summary of a micro-step is exact. Micro-steps 1..k−1
  leave, per layer, the smaller of the running sum Σ δᵀx (m·n float32, the original's
  weight_grad) and their (δ, x) pairs ((k−1)·tokens·(m + n) values in the compute dtype), chosen
  from shapes (`collect`); the last micro-step's backward adds them up in micro-step order (the
  float additions of one running sum) and projects. At 7B, 256 bf16 tokens a micro-step, the pairs
  win for every layer up to k = 17 (1.2 GiB a micro-step for all layers, against 24 GiB of sums);
  an attention layer keeps its sum once (k−1)·tokens exceeds 4096, an MLP one once it exceeds 5970.
- DDP: G is all-reduced inside the backward, on the last micro-step (the one where DDP reduces
  the parameter gradients), layer by layer in backward order, the same order on every rank.
- Offloading (--use_offloading, the original's flag): what waits between micro-steps (the sums
  or the pairs) and each layer's new P waiting for its merge live on the host
  (train.offload_device, the CPU); with one micro-step per update that is the P codes alone (0.5
  GiB at 7B). W_fp needs no host copy here: it is built at merge time, one layer at a time (the
  original builds every layer's W_fp before the forward and parks it on the CPU).
- Per-layer updates (train.py --per_layer_updates): B's gradient hook (`param_step`) steps B and
  merges its layer at once (its projection was made just before, in the same backward), so B's
  gradient, too, exists for one layer at a time. The weights equal those of the ordinary step (a
  test, bit for bit on CPU).
- Storage precision (--storage_dtype bfloat16): Q is 4-bit either way; B, the embeddings, norms
  and lm_head are stored in bf16, as in the original's pure-bf16 model. B follows the storage
  dtype because at paper scale it is not small: r·max(m, n) is 1.6B numbers at 7B (r 1024), a
  quarter of the model; float32 B and its gradient would add 6 GiB at 7B, and 4.7 GiB (B alone)
  would take 13B past 24 GiB. What stays float32: G, W_fp and every refresh computation (merge,
  SVD, compensation; results are written back in bf16) and all optimizer state (the adam8bit
  scales, and 32-bit moments whatever the parameter's dtype, as bitsandbytes keeps them).
- 8-bit embeddings (--adam8bit_embeddings): the embeddings' and lm_head's moments in 8 bits too,
  2 bytes per parameter instead of 8 (1.8 GiB of state at 13B; the 13B peak falls less, to 23.36
  GiB with --use_double_quant as well, because an 8-bit step decodes its moments to float32).

Deviations from the official code, and why:
- The original disables the adapter on a refresh step, merges before the forward and zeroes B's
  gradient (B moves by momentum alone). Here the refresh step trains normally, projects G in the
  backward and merges after B's optimizer step: G = ∂L/∂W is the same at deq(Q) + s·ΔW however W
  is split, and B keeps its update.
- Merges in float32 (the original merges in bf16); B is never swapped for 1×1 placeholders (the
  Parameter set stays fixed for DDP and the optimizer).
- --max_proj_gap caps the gap between refreshes (the original clamps the step values, which
  stops refreshing once T_k passes it).
- adam8bit keeps √v, not v, on a code without zero: a v rounded to 0 under a non-zero m gives huge
  steps (the "zero-point problem", Li et al. 2023). Not implemented: eigh, fp4, 1-bit.
- --dtype float16 (the original is bf16 only): a step the GradScaler skips (inf/NaN gradients)
  skips its refresh too: every tensor the refresh touches (Q, P, B, B's Adam state) is restored
  through a torch.where on "G is finite", and the schedule goes on. G comes from the scaled loss,
  which changes neither its singular vectors nor the merge.

Some warnings:
- Gradient accumulation with large micro-batches keeps a float32 m×n sum per adapted layer
  between micro-steps (24 GiB at 7B) unless --use_offloading puts them on the host (above).
- The projection runs inside the backward: a refresh step's backward is slower by the SVDs (the
  total work is the old one), and a LoQTLinear must run once per forward (a second backward in a
  refresh step raises: its G would be projected incomplete).
- Each requantization loses updates smaller than a quantization step: why the gaps grow.
- s multiplies the adapted weights' effective learning rate (Adam is scale-invariant): s·lr.
- Until the first refresh (update 0) P = 0: that update trains the embeddings, norms and head only.

Memory, estimated by memory.py (fake tensors; micro-batch 1 x 256, vocabulary 32000; GiB = 2^30):
    python memory.py --methods full,loqt --model_config PRESET [--storage_dtype bfloat16] \\
        [--per_layer_updates --grad_clipping 0] --method_args "loqt=--lora_r R [--optimizer adam8bit] [--use_offloading]"

    preset     r     storage   LoQT mode, optimizer              LoQT peak GiB        full-rank, same mode
    llama_1b   512   float32   whole model, adamw                 8.41                24.96
    llama_1b   512   float32   --per_layer_updates, adamw         6.76                18.37
    llama_1b   512   bfloat16  whole model, adamw                 4.62                12.49
    llama_1b   512   bfloat16  --per_layer_updates, adamw         3.98                 8.28
    llama_7b   1024  float32   whole model, adam8bit             24.40
    llama_7b   1024  float32   --use_offloading, adam8bit        23.91 (+0.5 host)
    llama_7b   1024  float32   --per_layer_updates, adam8bit     18.74
    llama_7b   1024  bfloat16  whole model, adam8bit             17.40                62.77
    llama_7b   1024  bfloat16  --use_offloading, adam8bit        16.90 (+0.5 host)
    llama_7b   1024  bfloat16  --per_layer_updates, adam8bit     14.79                39.59
    llama_13b  1024  bfloat16  --per_layer_updates, adam8bit     23.66

Before the projection moved into the backward, the whole-model peaks were the refresh step's G
of every layer (24 GiB at 7B): 12.82, 9.03, 48.04 and 41.03 GiB in the rows above, and offloading
parked those 24.1 GiB on the host. Now they are the optimizer step of the refresh update; at 7B
bf16: the weights 7.39 (NF4 W 3.39, bf16 B 3.02, embeddings and head 0.49, NF4 P 0.48), the bf16
gradients 3.50, Adam state 5.0 (8-bit moments of B 3.05, float32 ones of the embeddings and head
1.95; codes rewritten during the step count as temps), the new P codes waiting for their merges
0.48 (on the host with --use_offloading: the whole difference to its row) and the step's float32
workspace (about 1). A float32 B under bfloat16 storage measured 22.94 (7B offloading) and 28.38
(13B per-layer), before this change. The same two updates run for real on the CPU (python
memory.py --check, tiny and llama_9m: float32, bfloat16, per-layer, and 2 micro-steps with and
without offloading; llama_130m) agree with the estimate to 0.1%. A 7B estimate takes 60-160 s on
one CPU core.

Usage:
    python train.py --method loqt                                  # tiny defaults below
    python train.py --method loqt --optimizer adam8bit --use_double_quant
    torchrun --nproc-per-node 2 train.py --method loqt --num_training_steps 20 --check_ranks_every 1
    python train.py --method loqt --model_config llama_350m --lr 0.01 --lora_r 256 --lora_alpha 0.5 \\
        --update_proj_gap 100 --adamw_eps 1e-6 --grad_clipping 0 --refresh_optimizer_state keep  # 350M script
    python train.py --method loqt --model_config llama_7b --storage_dtype bfloat16 --lora_r 1024 \\
        --optimizer adam8bit --batch_size 1 --max_length 256             # 7B in 24 GiB, no offloading
    python train.py --method loqt --model_config llama_13b --storage_dtype bfloat16 --lora_r 1024 \\
        --optimizer adam8bit --per_layer_updates --grad_clipping 0 --batch_size 1 --max_length 256

Defaults, paper scripts (lr 0.01) vs here (tiny, lr 4e-3: the best on tiny in the README's LR sweep,
TRAIN_DEFAULTS; 500 steps): r 128-256 vs 32; s 0.4-0.5 vs 1.0 (s·lr 5e-3 vs 4e-3); τ 100 vs 50,
exponential, ψ 1.2 (10 refreshes in 500 steps); K 5; NF4 W and P. The original's command-line
defaults are static τ 50, K 0, no quantization, s 0.5.
"""

import functools
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import adapted_linear_names, materialize


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
    optimizer: str = opt("adamw", "adamw (torch) | adam8bit (8-bit block-wise state)", choices=["adamw", "adam8bit"])
    adam8bit_embeddings: bool = opt(False, "adam8bit: 8-bit state for the embeddings and lm_head too (default float32)")
    refresh_optimizer_state: str = opt("project", "B's Adam moments at a refresh", choices=["keep", "reset", "project"])
    use_offloading: bool = opt(False, "keep the refresh step's full gradients on the host, one layer on the device at a time")


TRAIN_DEFAULTS = {"lr": 4e-3}  # best on tiny in the README's LR sweep (1e-3 ... 8e-3, 1,000 updates, 2 seeds)
EVENT_EVERY_UPDATE = {"update_proj_gap": 1, "proj_gap_progression": "static"}  # a refresh at every update

# ----------------------------------------------------------------------------- quantization


def nf4_levels():
    """The 16 NF4 levels (QLoRA §3): N(0,1) quantiles, 8 positive and 7 negative ones plus an exact 0, scaled to [-1, 1]."""
    edge = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))  # the outermost quantile: between 2^4 and 2^4-1 equal-mass bins
    ramp = lambda n: [edge + (0.5 - edge) * i / (n - 1) for i in range(n - 1)]  # noqa: E731  (n-1 points, 0.5 left out)
    q = NormalDist().inv_cdf
    v = sorted([-q(p) for p in ramp(8)] + [0.0] + [q(p) for p in ramp(9)])
    return [x / v[-1] for x in v]


def dynamic_levels(signed, zero=True):
    """8-bit dynamic code: decade i (values in (10^-i-1, 10^-i]) gets 2^(bits-1-i) linear steps, so
    precision is relative, like a float with a variable-length exponent (Dettmers et al. 2022)."""
    bits = 7 if signed else 8
    mags = [10.0 ** -i * (0.1 + 0.9 * j / 2 ** (bits - 1 - i)) for i in range(bits) for j in range(1, 2 ** (bits - 1 - i) + 1)]
    return sorted(([-x for x in mags] if signed else []) + ([0.0] if zero else []) + mags)  # signed: 255; unsigned: 255


# plain Python numbers, turned into a tensor where they are used: no tensor outlives a fake-tensor run
LEVELS = {"4bit": nf4_levels(), "8bit": [i / 127 for i in range(-127, 128)], "dyn": dynamic_levels(True),
          "dyn+": dynamic_levels(False, zero=False)}
MIDPOINTS = {kind: [(a + b) / 2 for a, b in zip(v, v[1:])] for kind, v in LEVELS.items()}  # rounding boundaries
NF4_PAIRS = [[LEVELS["4bit"][byte >> 4], LEVELS["4bit"][byte & 15]] for byte in range(256)]  # a packed byte's 2 levels


def code(kind, device):
    return torch.tensor(LEVELS[kind], dtype=torch.float32, device=device)


def nf4_code():
    return code("4bit", "cpu")


def quantize_blockwise(x, kind, block):
    """x -> (idx uint8 (numel padded to the block), absmax float32 (blocks,)): idx = nearest level of x / absmax."""
    pad, flat = -x.numel() % block, x.float().reshape(-1)  # (a copy if x is not contiguous: SVD factors)
    flat = (F.pad(flat, (0, pad)) if pad else flat).view(-1, block)  # (blocks, block)
    absmax = flat.abs().amax(1)
    mids = torch.tensor(MIDPOINTS[kind], device=x.device)
    idx = torch.bucketize(flat / absmax.clamp_min(1e-30)[:, None], mids, out_int32=True)  # nearest level
    return idx.to(torch.uint8).flatten(), absmax


def dequantize_blockwise(idx, absmax, kind, numel):
    """levels·absmax, float32 (numel,). "4bit" idx are packed bytes: each one looks up its pair of levels.
    Temporaries: int32 indices and the float32 result, both of the padded size."""
    table = torch.tensor(NF4_PAIRS if kind == "4bit" else LEVELS[kind], device=idx.device)  # (256, 2) or (levels,)
    out = table.index_select(0, idx.int()).view(absmax.numel(), -1).mul_(absmax.unsqueeze(1))  # (blocks, block)
    return out.view(-1) if out.numel() == numel else out.view(-1)[:numel]


def pack4(idx):
    """Two 4-bit codes per byte: (2k,) values < 16 -> (k,) bytes, the first code in the high nibble."""
    return idx[0::2] << 4 | idx[1::2]


class QuantizedTensor(nn.Module):
    """A frozen tensor kept as codes and scales in buffers ("4bit" NF4, "8bit" int8, or "none": x's dtype).

    Buffers keep their shapes forever, so re-quantization copies in place and checkpoints load.
    dequantize() returns a new float32 tensor whatever the storage."""

    def __init__(self, x, kind, double_quant=False, block=64):
        super().__init__()
        self.kind, self.shape, self.numel, self.block, self.dtype = kind, tuple(x.shape), x.numel(), block, x.dtype
        self.double_quant = double_quant and kind != "none"
        for name, t in self.encode(x).items():
            self.register_buffer(name, t)

    def encode(self, x):
        if self.kind == "none":
            return {"data": x.detach().to(self.dtype, copy=True)}
        idx, absmax = quantize_blockwise(x, self.kind, self.block)
        out = {"codes": pack4(idx) if self.kind == "4bit" else idx}
        if not self.double_quant:
            return {**out, "absmax": absmax}
        offset = absmax.mean()  # QLoRA: scales are positive, so centre them before the signed 8-bit code
        idx2, absmax2 = quantize_blockwise(absmax - offset, "dyn", 256)
        return {**out, "absmax_codes": idx2, "absmax_scale": absmax2, "absmax_offset": offset}

    def decode(self, enc):
        if self.kind == "none":
            return enc["data"].to(torch.float32, copy=True)
        absmax = enc.get("absmax")
        if absmax is None:
            nblocks = -(-self.numel // self.block)
            absmax = dequantize_blockwise(enc["absmax_codes"], enc["absmax_scale"], "dyn", nblocks) + enc["absmax_offset"]
        return dequantize_blockwise(enc["codes"], absmax, self.kind, self.numel).view(self.shape)

    def dequantize(self):
        return self.decode(dict(self.named_buffers()))

    @torch.no_grad()
    def load_(self, enc):
        for name, t in self.named_buffers():
            t.copy_(enc[name])


# ----------------------------------------------------------------------------- the layer


class LoQTMatmul(torch.autograd.Function):
    """y = x·deq(Q)ᵀ + s·x·(B·P)ᵀ (left) or + s·x·(P·B)ᵀ (right), all in x's dtype.

    One node for both branches, so that on a refresh step G = Σ δᵀx is accumulated before ∂L/∂B
    is returned: B's post-accumulate-grad hook (--per_layer_updates) always sees a complete G."""

    @staticmethod
    def forward(ctx, x, B, layer):
        dt, s = x.dtype, layer.s
        P, Bc = layer.P.dequantize().to(dt), B.to(dt)
        y = F.linear(x, layer.W.dequantize().to(dt))  # (…, m)
        if layer.left:
            xp = F.linear(x, P)  # (…, r)
            y = y + s * F.linear(xp, Bc)
            ctx.save_for_backward(x if layer.collect_G is not None else None, xp, B)  # x only when G is wanted
        else:
            y = y + s * F.linear(F.linear(x, Bc), P)
            ctx.save_for_backward(x, None, B)
        ctx.layer = layer
        return y

    @staticmethod
    def backward(ctx, gy):
        layer, (x, xp, B) = ctx.layer, ctx.saved_tensors
        dt, s = gy.dtype, layer.s
        P, Bc = layer.P.dequantize().to(dt), B.to(dt)
        gy2 = gy.reshape(-1, gy.shape[-1])  # (tokens, m)
        if layer.collect_G is not None:  # a refresh step: this micro-step's share of G = Σ δᵀx (and, on the
            collect(layer, gy2, x.reshape(-1, x.shape[-1]))  # last one, the projection), before ∂L/∂B exists
        gB = gx = None
        if ctx.needs_input_grad[1]:  # left: s·δᵀ(x Pᵀ), (m, r); right: s·(δ P)ᵀ x, (r, n)
            gB = s * (gy2.T @ xp.reshape(-1, layer.r) if layer.left else (gy2 @ P).T @ x.reshape(-1, x.shape[-1]))
            gB = gB.to(B.dtype)
        if ctx.needs_input_grad[0]:  # δ·(deq(Q) + s·ΔW), ΔW never formed
            gx = gy @ layer.W.dequantize().to(dt) + s * ((gy @ Bc) @ P if layer.left else (gy @ P) @ Bc)
        return gx, gB, None


class LoQTLinear(nn.Module):
    """W = deq(Q) + s·B·P (left, n ≤ m) or deq(Q) + s·P·B (right): Q and P frozen buffers, B trains.

    B is created in the dtype of the weight it replaces (the storage dtype)."""

    def __init__(self, linear, cfg):
        super().__init__()
        m, n, r = linear.out_features, linear.in_features, cfg.lora_r
        self.s, self.r, self.left = cfg.lora_alpha, r, n <= m  # P on the smaller side
        w = linear.weight.detach()
        self.W = QuantizedTensor(w, cfg.quantize_w, cfg.use_double_quant)  # Q
        self.P = QuantizedTensor(w.new_zeros((r, n) if self.left else (m, r)), cfg.quantize_projection_matrix)
        self.B = nn.Parameter(w.new_zeros((m, r) if self.left else (r, n)))
        self.bias = linear.bias
        self.collect_G = None  # refresh step: where G's share of earlier micro-steps waits (host if offloaded); else None
        self.micro_left = None  # refresh step: backward passes still to come before G is complete (None: driven by hand)
        self.check_finite = False  # refresh step under float16: note whether G is finite (the GradScaler may skip)
        self.grad_W = None  # Σ δᵀx of the micro-steps so far, float32 (m, n), while smaller than their (δ, x) pairs
        self.G_parts = []  # or those (δ, x) pairs themselves, while smaller than that sum (see collect)
        self.pending = None  # (the new P encoded, "G finite" or None): from G's projection to the merge
        self.stats = None  # (kept error, plain requantization error, skipped) of the last refresh, 0-dim tensors

    def delta(self, P=None):
        """ΔW = B·P (left) or P·B (right), float32, (m, n); P: deq(P) if already at hand."""
        P = self.P.dequantize() if P is None else P
        return self.B.float() @ P if self.left else P @ self.B.float()

    def merged_weight(self, P=None):
        return self.W.dequantize() + self.s * self.delta(P)

    def forward(self, x):
        dev = x.device.type  # compute where nn.Linear would: the autocast dtype if autocast is on
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        y = LoQTMatmul.apply(x.to(dt), self.B, self)
        return y if self.bias is None else y + self.bias


def loqt_layers(model):
    return [m for m in model.modules() if isinstance(m, LoQTLinear)]


def wrap(model, cfg, train=None):
    """Replace every attn/mlp nn.Linear by a LoQTLinear; embeddings, norms and lm_head stay full-rank and trainable."""
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0 or cfg.update_proj_gap < 1 or cfg.increment_size < 0:
        raise ValueError("--lora_r, --lora_alpha and --update_proj_gap must be positive and --increment_size >= 0")
    if cfg.compensate_quant_error_iterations < 0 or cfg.max_proj_gap < 0:
        raise ValueError("--compensate_quant_error_iterations and --max_proj_gap must be >= 0")
    if cfg.adam8bit_embeddings and cfg.optimizer != "adam8bit":
        raise ValueError("--adam8bit_embeddings needs --optimizer adam8bit")
    for name in adapted_linear_names(model):
        lin = materialize(model, name)  # real weights for this layer only: the full-precision model never exists
        if cfg.lora_r > min(lin.in_features, lin.out_features):
            raise ValueError(f"--lora_r {cfg.lora_r} exceeds the smaller side of {name} "
                             f"({lin.out_features}x{lin.in_features})")
        parent, child = name.rpartition(".")[::2]
        setattr(model.get_submodule(parent), child, LoQTLinear(lin, cfg))
    return model


@torch.no_grad()
def export(model, cfg):
    """A plain GPT state dict on the CPU: every LoQTLinear becomes `<name>.weight` = deq(Q) + s·ΔW in
    B's (the storage) dtype, built on the device and moved to the CPU one layer at a time."""
    adapted = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoQTLinear)}
    inside = tuple(name + "." for name in adapted)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(inside)}
    for name, mod in adapted.items():
        sd[name + ".weight"] = mod.merged_weight().to(mod.B.dtype).cpu()
        if mod.bias is not None:
            sd[name + ".bias"] = mod.bias.detach().cpu()
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
    says bits=32 (embeddings and lm_head, as bitsandbytes users are told to do). Parameters
    without a gradient are skipped (--per_layer_updates steps one at a time)."""

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
                        set_moments(st, *[torch.zeros(p.numel(), device=p.device)] * 2)
                    else:  # float32 whatever p's dtype, like bitsandbytes' 32-bit state
                        st["exp_avg"], st["exp_avg_sq"] = (torch.zeros_like(p, dtype=torch.float32) for _ in range(2))
                st["step"] += 1
                t, grad = st["step"], p.grad.flatten()  # t stays a tensor: no host sync, fake-tensor safe
                m, v = (x.flatten() for x in get_moments(st))
                m.mul_(b1).add_(grad, alpha=1 - b1)  # m ← β1·m + (1−β1)·g, in float32 whatever g's dtype
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)  # v ← β2·v + (1−β2)·g²
                if "exp_avg" not in st:
                    set_moments(st, m, v)
                p.mul_(1 - lr * g["weight_decay"])
                upd = v.sqrt().div_((1 - b2 ** t).sqrt()).add_(g["eps"])  # √v̂ + ε: the step's one float32 buffer
                torch.div(m, upd, out=upd).mul_(lr / (1 - b1 ** t))  # lr·m̂/(√v̂ + ε), in place
                p.sub_(upd.view_as(p))
        return None

    def load_state_dict(self, state_dict):
        """torch's loader casts every state tensor of a floating-point parameter to that parameter's
        dtype (uint8 codes included); here each one keeps its saved dtype and moves to the device."""
        super().load_state_dict({**state_dict, "state": {}})  # hyperparameters and group checks only
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, [p for g in self.param_groups for p in g["params"]]):
            if i in state_dict["state"]:
                self.state[p] = {k: (v.clone() if k == "step" else v.to(p.device, copy=True)) if torch.is_tensor(v) else v
                                 for k, v in state_dict["state"][i].items()}


def make_optimizer(model, cfg, train):
    """Groups: adapter factors and other matrices (weight decay), embeddings/lm_head (bits=32 unless
    --adam8bit_embeddings), vectors (no decay)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    full = lambda n: "embed" in n or "lm_head" in n  # noqa: E731
    groups = [{"params": [p for n, p in named if p.dim() >= 2 and not full(n)], "weight_decay": train.weight_decay},
              {"params": [p for n, p in named if p.dim() >= 2 and full(n)], "weight_decay": train.weight_decay,
               "bits": 8 if cfg.adam8bit_embeddings else 32},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    return Adam8bit(groups, **kw) if cfg.optimizer == "adam8bit" else torch.optim.AdamW(groups, **kw)


# ----------------------------------------------------------------------------- the refresh event


@functools.lru_cache(maxsize=16)
def schedule(tau, progression, psi, max_gap, num_training_steps):
    """(T_0, T_1, ...) ≤ num_training_steps and their frozenset, computed once per setting."""
    steps, t, k, gap = [0], tau, 0, float(tau)
    while t <= num_training_steps:
        steps.append(t)
        k += 1
        if progression == "linear":
            gap += psi  # summed in floating point, as the original
            step_gap = int(gap)
        else:
            step_gap = tau if progression == "static" else tau + int(psi ** k)
        t += min(step_gap, max_gap) if max_gap else step_gap
    return tuple(steps), frozenset(steps)


def refresh_steps(cfg, num_training_steps):
    """T_0 = 0, T_1 = τ, then gaps per --proj_gap_progression; steps ≤ num_training_steps."""
    return list(schedule(cfg.update_proj_gap, cfg.proj_gap_progression, cfg.increment_size, cfg.max_proj_gap,
                         num_training_steps)[0])


def is_refresh_step(step, cfg, train):
    args = cfg.update_proj_gap, cfg.proj_gap_progression, cfg.increment_size, cfg.max_proj_gap, train.num_training_steps
    return step in schedule(*args)[1]


def step_start(step, model, cfg, train):
    """On a refresh step, every layer starts collecting G = ∂L/∂W: it expects one backward per micro-step."""
    if is_refresh_step(step, cfg, train):
        for layer in loqt_layers(model):
            layer.collect_G = torch.device(train.offload_device) if cfg.use_offloading else layer.B.device
            layer.micro_left, layer.check_finite = train.grad_accum, train.dtype == "float16"


def collect(layer, gy, x):
    """In the layer's backward on a refresh step: gy (tokens, m) and x (tokens, n) of this micro-step.

    Not the last micro-step: keep its share of G where collect_G says, either as the running sum
    Σ δᵀx (float32 m×n, as the original's weight_grad) or as the pair (δ, x) itself, whichever is
    smaller for the micro-steps still to come: (micro-steps before the last)·tokens·(m + n) values
    in the compute dtype against m·n float32. The SVD is not linear, so no r-dimensional summary of
    a micro-step would do: the sum has to be formed in full. The last micro-step: G is complete
    (every share summed in micro-step order, the same float operations as one running sum), and
    projected at once; G is freed before the next layer's backward."""
    if layer.micro_left is not None:
        if layer.micro_left < 1:
            raise RuntimeError("a LoQTLinear ran more backward passes on a refresh step than there are micro-steps; "
                               "each layer must be used once per forward")
        layer.micro_left -= 1
        if layer.micro_left == 0:
            project(layer, sum_G(layer, gy, x))
            return
    m, n = gy.shape[1], x.shape[1]
    pairs_fit = layer.micro_left is not None and layer.grad_W is None and \
        layer.micro_left * gy.shape[0] * (m * gy.element_size() + n * x.element_size()) <= 4 * m * n
    if layer.G_parts or pairs_fit:  # (shapes only: the choice is made on the first micro-step, and kept)
        layer.G_parts.append((gy.to(layer.collect_G), x.to(layer.collect_G)))
    else:
        g = (gy.float().T @ x.float()).to(layer.collect_G)  # G += δᵀx, (m, n), float32
        layer.grad_W = g if layer.grad_W is None else layer.grad_W.add_(g)


def sum_G(layer, gy=None, x=None, device=None):
    """G, complete, float32 (m, n) on the compute device: the running sum, or the kept (δ, x) pairs, plus
    this micro-step's δᵀx; the layer lets go of both. (Device-side adds equal host-side ones bit for bit.)"""
    device = gy.device if gy is not None else device
    G = None if layer.grad_W is None else layer.grad_W.to(device)
    parts = layer.G_parts + ([(gy, x)] if gy is not None else [])
    layer.grad_W, layer.G_parts = None, []
    for d, xi in parts:
        g = d.to(device).float().T @ xi.to(device).float()
        G = g if G is None else G.add_(g)
    return G


@torch.no_grad()
def project(layer, G):
    """G (complete, this rank's micro-steps) -> the layer's next projector, kept encoded in layer.pending
    until the merge (on the host with --use_offloading); G and the SVD factors are freed here.

    All-reduce G over ranks (DDP reduces parameter gradients only: G is ours; SUM, as gloo has no
    AVG); P = top-r singular vectors of G (float32 SVD; left: right singular vectors as rows, right:
    left ones as columns), encoded as P is stored. float16: G may be inf/NaN (the GradScaler then
    skips the step): note it, and run the SVD on a finite G whose result the merge will drop."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(G)
        G /= dist.get_world_size()
    ok = None
    if layer.check_finite:
        ok = torch.isfinite(G).all()
        G.nan_to_num_(0.0, 0.0, 0.0)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)  # float32 SVD of the full gradient
    del G, S
    enc = layer.P.encode(Vh[:layer.r] if layer.left else U[:, :layer.r])  # top-r right / left vectors
    del U, Vh
    where = layer.collect_G or layer.B.device  # --use_offloading: it waits for the merge on the host, too
    layer.pending = ({k: t.to(where) for k, t in enc.items()}, ok)


@torch.no_grad()
def compensated_init(layer, W_fp, K, P=None):
    """Q and B with deq(Q) + s·ΔW ≈ W_fp: K rounds of LoftQ-style alternation, keep the best round.

    P: deq(P), if already at hand. Returns (error of the kept round, error of plain requantization),
    both ‖W_fp − deq(Q) − s·ΔW‖_F, as 0-dim tensors."""
    s, left = layer.s, layer.left
    if K == 0 or layer.W.kind == "none":  # plain requantization, B = 0
        enc = layer.W.encode(W_fp)
        err = (W_fp - layer.W.decode(enc)).norm()
        layer.W.load_(enc)
        layer.B.zero_()
        return err, err
    P = layer.P.dequantize() if P is None else P
    P_pinv = torch.linalg.pinv(P)  # P⁺ (n×r left, r×m right); = Pᵀ when P is orthonormal and unquantized
    C = W_fp  # besides W_fp, at most three m×n float32 buffers live at once (C or R, ΔW, quantization temporaries)
    for k in range(K):
        enc = layer.W.encode(C)  # Q_k = quant(C_{k-1})
        del C
        R = layer.W.decode(enc).neg_().add_(W_fp)  # R_k = W_fp − deq(Q_k)
        B = R @ P_pinv / s if left else P_pinv @ R / s  # B_k = R_k·P⁺/s  or  P⁺·R_k/s
        dW = (B @ P if left else P @ B).mul_(s)  # s·ΔW_k
        if k == 0:
            err0 = R.norm()
        err = R.sub_(dW).norm()  # e_k = ‖W_fp − (deq(Q_k) + s·ΔW_k)‖_F
        if k == 0:
            best = (err, enc, B)
        else:  # a tensor comparison, no Python branch: the first of equal errors wins, as with `<`
            better = err < best[0]
            best = (torch.where(better, err, best[0]), {n: torch.where(better, t, best[1][n]) for n, t in enc.items()},
                    torch.where(better, B, best[2]))
        del R
        C = dW.neg_().add_(W_fp)  # C_k = W_fp − s·ΔW_k, in ΔW's buffer
    layer.W.load_(best[1])
    layer.B.copy_(best[2])
    return best[0], err0


@torch.no_grad()
def adjust_optimizer_state(layer, optimizer, how, P_old, P_new):
    """Adam moments of B after P changed: keep, reset (m = v = 0, step 0) or project onto the new basis."""
    st = optimizer.state.get(layer.B)
    if how == "keep" or not st:
        return
    m, v = (x.float() for x in get_moments(st))  # torch's AdamW keeps a bf16 B's moments in bf16
    if how == "reset":
        st["step"].zero_()
        m, v = torch.zeros_like(m), torch.zeros_like(v)
    else:  # coordinates of old rows/columns of P in the new ones: C = P_old·P_newᵀ (left, r×r)
        C = P_old @ P_new.T if layer.left else P_new.T @ P_old
        m, v = m.view(layer.B.shape), v.view(layer.B.shape)
        m, v = (m @ C, v @ C.square()) if layer.left else (C @ m, C.square() @ v)
    set_moments(st, m, v)


@torch.no_grad()
def merge(layer, optimizer, cfg):
    """One layer, after B's optimizer step: merge s·ΔW, load the new P (layer.pending), error-compensated
    Q and B, B's Adam state. Besides W_fp it holds at most three m×n float32 buffers (compensated_init)."""
    enc, ok = layer.pending
    layer.pending = None
    ddp = dist.is_available() and dist.is_initialized()
    skipped = torch.zeros(())
    if ok is not None:  # float16: keep what a skipped step must restore
        st = optimizer.state.get(layer.B, {})
        tensors = [*layer.W.buffers(), *layer.P.buffers(), layer.B]
        before = [t.clone() for t in tensors], {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
    P_old = layer.P.dequantize()
    layer.P.load_(enc)
    del enc
    for t in layer.P.buffers() if ddp else []:  # rank 0's P everywhere, even if SVDs differ in the last bit
        dist.broadcast(t, 0)
    W_fp = layer.merged_weight(P_old)  # W_fp = deq(Q) + s·B·P_old, float32 (m, n): Q and B are still the old ones
    P_new = layer.P.dequantize()
    err, err0 = compensated_init(layer, W_fp, cfg.compensate_quant_error_iterations, P_new)
    for t in [*layer.W.buffers(), layer.B.data] if ddp else []:
        dist.broadcast(t, 0)
    adjust_optimizer_state(layer, optimizer, cfg.refresh_optimizer_state, P_old, P_new)
    if ok is not None:
        for t, old in zip(tensors, before[0]):
            t.copy_(torch.where(ok, t, old))
        for k, old in before[1].items():
            st[k] = torch.where(ok, st[k], old)
        skipped = (~ok).float()
    norm = W_fp.norm().clamp_min(1e-30)
    layer.stats = torch.stack([err / norm, err0 / norm, skipped.to(norm.device)])


def param_step(step, p, model, optimizer, cfg, train):
    """--per_layer_updates: B's gradient is complete, and its layer's projection is already made (its
    backward projects G before returning ∂L/∂B). Step B now (the only parameter with a gradient) and
    merge the layer; train.py's own step then finds no gradient on B."""
    if not is_refresh_step(step, cfg, train):
        return
    layer = next((l for l in loqt_layers(model) if l.B is p and l.pending is not None), None)
    if layer is not None:
        optimizer.step()
        p.grad = None
        merge(layer, optimizer, cfg)


@torch.no_grad()
def after_step(step, model, optimizer, cfg, train):
    """Merge every layer whose projection is waiting (all of them on a refresh step, unless param_step
    did), one at a time. A layer still holding its G (driven by hand, without step_start) is projected first."""
    layers = loqt_layers(model)
    for layer in layers:
        if layer.grad_W is not None or layer.G_parts:
            layer.check_finite = layer.check_finite or train.dtype == "float16"
            project(layer, sum_G(layer, device=layer.B.device))
        if layer.pending is not None:
            merge(layer, optimizer, cfg)
        layer.collect_G = layer.micro_left = None
        layer.check_finite = False
    done = [l for l in layers if l.stats is not None]
    if not done:
        return {}
    stats = torch.stack([l.stats for l in done]).mean(0)
    for l in done:
        l.stats = None
    out = {"refresh": 1.0, "quant_err": stats[0], "quant_err_uncompensated": stats[1]}
    return {**out, "refresh_skipped": stats[2]} if train.dtype == "float16" else out
