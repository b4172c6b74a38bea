"""Swin Transformer V2 (arXiv 2111.09883), computed as microsoft/Swin-Transformer computes it.

State-dict keys are the official ones (`layers.{i}.blocks.{j}.attn.cpb_mlp.0.weight`, downsampling at
the end of stages 0-2, `head.weight`), so official checkpoints load after `checkpoint_filter_fn`.
Shape-derived buffers (`relative_coords_table`, `relative_position_index`, and `attn_regions`, from which
the official `attn_mask` is built on use) are non-persistent: they are rebuilt for the target window,
never loaded; the official checkpoints' copies are dropped on load.

Four additions the official code lacks:
- `extra_norm_period`: the paper's extra main-branch LayerNorm "every 6 layers" for H/G. Counted per
  stage (as timm's CR port does): block j of a stage gets `norm3` after its MLP residual when
  (j + 1) % period == 0.
- sequential attention: per stage, window attention in chunks of `attn_chunk_size` windows, each chunk
  recomputed in backward, so no (windows, heads, N, N) score tensor is ever held whole.
- `cpb_coords="linear"`: the paper's linear-spaced CPB ablation (Table 1), for the transfer comparison in
  scripts/transfer_table.py; "log" (the default) is the official log-spaced CPB.
- `attn_impl="flex"`: FlexAttention with the CPB bias and the shift mask as a score_mod, so neither the
  (heads, N, N) bias nor the (windows, N, N) mask is built. torch's FlexAttention has no CPU backward: on
  CPU it serves inference only.
"""
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from models import layouts

GRAD_CHECKPOINTING_MODES = ("none", "torch", "torch_reentrant")  # others are applied from outside the model
ATTN_IMPLS = ("sdpa", "plain", "flex")
CPB_COORDS = ("log", "linear")
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)  # cosine-attention temperature >= 0.01


def total_stride(patch_size: int, num_stages: int) -> int:
    """Image pixels per token side in the last stage: img_size must be a multiple of it."""
    return patch_size * 2 ** (num_stages - 1)


def feature_map_sides(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Tokens per side of each stage's square feature map: img_size / patch_size / 2^i."""
    return [img_size // patch_size // 2 ** i for i in range(num_stages)]


def block_window(resolution: int, window_size: int) -> int:
    """The window a block uses on a resolution x resolution feature map: a map no larger than the
    configured window is one window (and then nothing is shifted). It must divide the map."""
    return min(window_size, resolution)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(-1, window * window, C)


class _PermuteTokens(torch.autograd.Function):
    """x[:, order] for a permutation `order`, whose gradient is the inverse gather (not a scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def window_token_order(resolution: int, window: int, shift: int) -> torch.Tensor:
    """(L,) token index of each position of the cyclically shifted, window-partitioned map: one gather
    does torch.roll + window_partition (three copies in eager mode, with roll over two dims)."""
    idx = torch.arange(resolution * resolution).view(1, resolution, resolution, 1)
    if shift:
        idx = torch.roll(idx, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(idx, window).flatten()


def relative_coords_table(window: int, pretrained_window: int, coords: str = "log") -> torch.Tensor:
    """CPB inputs, (2W-1, 2W-1, 2), with offsets in units of (pretrained_window - 1), so offsets inside the
    pretraining window keep their pretraining values and larger ones extrapolate.

    log (the paper's log-spaced CPB, as the official code computes it): offsets / (pretrained_window - 1) * 8,
    then sign * log2(1 + |x|) / log2(8); +-1.06 at the training window.
    linear (Table 1's linear-spaced CPB ablation, as the authors' research code computes it,
    `relative_coords_table_type == 'linear'` in SwinTransformer/Feature-Distillation
    models/swin_transformer_v2.py): offsets / (pretrained_window - 1); +-1 at the training window."""
    if coords not in CPB_COORDS:
        raise ValueError(f"cpb_coords must be one of {CPB_COORDS}, got {coords!r}")
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)
    divisor = (pretrained_window if pretrained_window > 0 else window) - 1
    table = table / max(divisor, 1)
    if coords == "linear":
        return table
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: int) -> torch.Tensor:
    """Index of each (query, key) pair's offset into the flattened (2W-1)^2 table, (N, N) int64."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), each in [0, 2W-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shift_regions(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N) region id of each token of each shifted window: tokens that the cyclic shift brought
    together from different image regions must not attend to each other."""
    regions = torch.zeros(1, H, W, 1)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((h, w) for h in slices for w in slices):
        regions[:, hs, ws, :] = i
    return window_partition(regions, window).squeeze(-1)


def region_mask(regions: torch.Tensor) -> torch.Tensor:
    """(nW, N) region ids -> (nW, N, N) additive mask: -100 between tokens of different regions, else 0.
    Built when used rather than stored: at 1536px/w32 the stored mask alone would be 576 MB per block."""
    return (regions.unsqueeze(1) != regions.unsqueeze(2)).to(torch.float32) * -100.0


def attend(q, k, v, bias, impl: str) -> torch.Tensor:
    """softmax(q k^T + bias) v with q already cosine-normalised and scaled (no 1/sqrt(d))."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1) @ v


def flex_score_mod(table: torch.Tensor, window: int, regions: torch.Tensor | None):
    """FlexAttention score_mod adding what `position_bias` and `region_mask` add, computed per score from the
    indices: table[h, offset of (q, kv)] from the (nH, (2W-1)^2) CPB table, and -100 where regions[b % R]
    (R windows' region ids, (R, N)) differ between q and kv. The table's gradient flows through the gather."""
    span = 2 * window - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        row, col = q_idx // window - kv_idx // window + window - 1, q_idx % window - kv_idx % window + window - 1
        score = score + table[h, row * span + col]
        if regions is None:
            return score
        w = b % regions.shape[0]
        return torch.where(regions[w, q_idx] == regions[w, kv_idx], score, score - 100.0)
    return score_mod


def allow_recompiles(n: int) -> None:
    """Raise dynamo's per-function budget of compiled variants (recompile_limit, 8 by default) to at least
    `n`: past it, the function runs eagerly for good. Only ever raised, by whoever compiles more variants."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)


@functools.cache
def compiled_flex_attention():
    """flex_attention under torch.compile, once per process, as its documentation prescribes: only the
    compiled call is fused (Triton on GPU, inductor's C++ template on CPU); eager flex_attention
    materialises the scores. Built on first use: torch.compile and the import cost seconds per process.

    Static shapes: on CPU torch 2.14's C++ flex template fails to compile with a dynamic batch. Each
    (heads, head dim, window, masked or not, batch, grad mode, autocast) is then its own compiled variant,
    a few per stage, and every variant counts against dynamo's per-function budget, past which flex_attention
    falls back to eager and unfused: the budget is raised to 64."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    allow_recompiles(64)
    return compiled


@torch.compiler.disable
def flex_attend(q, k, v, table: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """`attend` with the bias as a score_mod: q, k, v (B_, nH, N, d), the CPB table (nH, (2W-1)^2), window b's
    region ids regions[b % R] or None. Always the one compiled flex_attention, also under a caller's
    torch.compile (a graph of its own there): torch 2.14 finds no CPU kernel for flex_attention traced inside
    a larger graph (inductor's NoValidChoicesError)."""
    if q.device.type == "cpu" and q.requires_grad:
        raise NotImplementedError("attn_impl='flex' cannot train on CPU: torch's FlexAttention has no CPU "
                                  "backward; use attn_impl sdpa or plain there")
    score_mod = flex_score_mod(table, math.isqrt(q.shape[-2]), regions)
    return compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=1.0)


def _attend_chunk(q, k, v, rel_bias, regions, start: int, impl: str) -> torch.Tensor:
    """Attention for the chunk of flattened windows starting at `start`; its mask rows are built here so
    that a checkpointed call saves nothing of chunk size. rel_bias is the CPB table for impl flex."""
    if regions is not None:
        rows = torch.arange(start, start + q.shape[0], device=regions.device) % regions.shape[0]
        regions = regions.index_select(0, rows)
    if impl == "flex":
        return flex_attend(q, k, v, rel_bias, regions)
    bias = rel_bias.unsqueeze(0)
    if regions is not None:
        bias = bias + region_mask(regions).to(bias.dtype).unsqueeze(1)  # (c, nH, N, N)
    return attend(q, k, v, bias, impl)


@torch.no_grad()
def init_module(m: nn.Module) -> None:
    """The official initialisation of one module's own parameters (not its children's): Linear
    trunc_normal(std .02) and bias 0, LayerNorm 1 / 0 but res-post norms 0 / 0, the patch conv PyTorch's
    default, logit_scale log(10), q/v bias 0, a mask token trunc_normal(std .02). Module by module, so that
    an engine can initialise a sharded model one gathered module at a time."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        (nn.init.zeros_ if getattr(m, "res_post_norm", False) else nn.init.ones_)(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        m.reset_parameters()
    elif isinstance(m, WindowAttention):
        m.init_weights()
    if isinstance(getattr(m, "mask_token", None), nn.Parameter):
        nn.init.trunc_normal_(m.mask_token, std=0.02)


def holds_values(p: nn.Parameter) -> bool:
    """False for a parameter that is not materialised on this rank: on the meta device, or partitioned at
    construction by a sharding engine (which leaves an empty local tensor, as DeepSpeed's zero.Init does). A
    constructor then leaves initialisation to whoever builds it that way (`init_module` per module, once the
    values exist or are gathered)."""
    return not p.is_meta and p.numel() > 0


class WindowAttention(nn.Module):
    """Scaled cosine window attention with a continuous position bias (CPB), log-spaced by default."""

    def __init__(self, dim: int, num_heads: int, window_size: int, pretrained_window_size: int,
                 attn_impl: str, sequential: bool, chunk_size: int, cpb_coords: str = "log"):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.cpb_coords = cpb_coords
        self.attn_impl = attn_impl
        self.sequential = sequential
        self.chunk_size = chunk_size
        self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.empty(dim))
        self.v_bias = nn.Parameter(torch.empty(dim))
        self.proj = nn.Linear(dim, dim)
        N = window_size * window_size
        self.register_buffer("relative_coords_table", torch.empty(2 * window_size - 1, 2 * window_size - 1, 2),
                             persistent=False)
        self.register_buffer("relative_position_index", torch.empty(N, N, dtype=torch.long), persistent=False)

    def init_weights(self):
        nn.init.constant_(self.logit_scale, math.log(10))
        nn.init.zeros_(self.q_bias)
        nn.init.zeros_(self.v_bias)

    def init_buffers(self):
        self.relative_coords_table.copy_(relative_coords_table(self.window_size, self.pretrained_window_size,
                                                               self.cpb_coords))
        self.relative_position_index.copy_(relative_position_index(self.window_size))

    def position_bias_table(self) -> torch.Tensor:
        """16 * sigmoid(CPB) per head and offset, (nH, (2W-1)^2): the sigmoid runs on the table, not on the
        (nH, N, N) bias gathered from it."""
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table)).view(-1, self.num_heads).t()

    def position_bias(self) -> torch.Tensor:
        """The CPB bias of every (query, key) pair, (nH, N, N)."""
        N = self.window_size * self.window_size
        return self.position_bias_table()[:, self.relative_position_index.view(-1)].view(-1, N, N)

    def forward(self, x: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
        """x (B * nW, N, C), shifted-window regions (nW, N) or None -> (B * nW, N, C)."""
        B_, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # k has no bias
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, nH, N, d)
        # cosine similarity times the clamped learned scale, folded into q: one pass over q, not over q k^T
        scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        q = q * (scale / q.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        k = k * (1.0 / k.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.attn_impl == "flex":  # the table itself: the bias is gathered per score inside the kernel
            rel_bias = self.position_bias_table().contiguous()
        else:
            rel_bias = self.position_bias()
        if self.sequential:
            out = self._sequential(q, k, v, rel_bias, regions)
        elif self.attn_impl == "flex":
            out = flex_attend(q, k, v, rel_bias, regions)
        elif regions is None:
            out = attend(q, k, v, rel_bias.unsqueeze(0), self.attn_impl)
        else:  # (B, nW * nH, N, d) against a (1, nW * nH, N, N) bias: broadcast over images, never repeated,
            # and 4-D so that SDPA can pick a fused kernel
            nW = regions.shape[0]
            q, k, v = (t.reshape(B_ // nW, nW * self.num_heads, N, -1) for t in (q, k, v))
            bias = (rel_bias + region_mask(regions).to(rel_bias.dtype).unsqueeze(1)).view(1, nW * self.num_heads, N, N)
            out = attend(q, k, v, bias, self.attn_impl).reshape(B_, self.num_heads, N, -1)
        return self.proj(out.transpose(1, 2).reshape(B_, N, C))

    def _sequential(self, q, k, v, rel_bias, regions) -> torch.Tensor:
        recompute = torch.is_grad_enabled()
        outs = []
        chunks = zip(q.split(self.chunk_size), k.split(self.chunk_size), v.split(self.chunk_size))
        for i, (qc, kc, vc) in enumerate(chunks):
            args = (qc, kc, vc, rel_bias, regions, i * self.chunk_size, self.attn_impl)
            if recompute:
                outs.append(torch.utils.checkpoint.checkpoint(_attend_chunk, *args, use_reentrant=False))
            else:
                outs.append(_attend_chunk(*args))
        return torch.cat(outs)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or at rate 0)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


class SwinTransformerBlock(nn.Module):
    """Res-post-norm block: x + norm1(attn(x)), then x + norm2(mlp(x)) [, then norm3 on the main branch]."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window_size: int, shift: bool,
                 pretrained_window_size: int, mlp_ratio: float, drop_path: float, extra_norm: bool,
                 attn_impl: str, sequential: bool, chunk_size: int, cpb_coords: str = "log"):
        super().__init__()
        self.resolution = resolution
        window_size = block_window(resolution, window_size)
        shift = shift and window_size < resolution  # one window covers the map: nothing to shift
        if resolution % window_size:
            raise ValueError(f"feature map {resolution}x{resolution} is not divisible by window_size {window_size}")
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.attn = WindowAttention(dim, num_heads, window_size, pretrained_window_size, attn_impl, sequential,
                                    chunk_size, cpb_coords)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)
        self.norm1.res_post_norm = self.norm2.res_post_norm = True  # zero-initialised: blocks start as identity
        self.norm3 = nn.LayerNorm(dim) if extra_norm else None
        N, nW, L = window_size * window_size, (resolution // window_size) ** 2, resolution * resolution
        self.register_buffer("attn_regions", torch.empty(nW, N) if self.shift_size else None, persistent=False)
        self.register_buffer("token_order", torch.empty(L, dtype=torch.long), persistent=False)
        self.register_buffer("token_inverse", torch.empty(L, dtype=torch.long), persistent=False)

    def init_buffers(self):
        R = self.resolution
        if self.attn_regions is not None:
            self.attn_regions.copy_(shift_regions(R, R, self.window_size, self.shift_size))
        order = window_token_order(R, self.window_size, self.shift_size)
        self.token_order.copy_(order)
        self.token_inverse.copy_(torch.argsort(order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        x = x + self.drop_path(self.norm1(self._window_attention(x)))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        return x if self.norm3 is None else self.norm3(x)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Shift, partition, attend, merge, shift back; (B, L, C) -> (B, L, C)."""
        B, L, C = x.shape
        windows = _PermuteTokens.apply(x, self.token_order, self.token_inverse).view(-1, self.window_size ** 2, C)
        out = self.attn(windows, self.attn_regions).view(B, L, C)
        return _PermuteTokens.apply(out, self.token_inverse, self.token_order)


class PatchMerging(nn.Module):
    """V2 merging: 2x2 neighbours -> 4C (official x0, x1, x2, x3 order) -> Linear to 2C -> LayerNorm(2C)."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):  # (B, L, C) -> (B, L / 4, 2C)
        B, L, C = x.shape
        R = self.resolution
        x = x.view(B, R // 2, 2, R // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, L // 4, 4 * C)
        return self.norm(self.reduction(x))


class BasicLayer(nn.Module):
    """One stage: blocks, then (stages 0..n-2) patch merging, as in the official layout."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window_size: int,
                 pretrained_window_size: int, mlp_ratio: float, drop_path: Sequence[float], extra_norm_period: int,
                 attn_impl: str, sequential: bool, chunk_size: int, downsample: bool, cpb_coords: str = "log"):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, resolution, num_heads, window_size, shift=j % 2 == 1,
                                 pretrained_window_size=pretrained_window_size, mlp_ratio=mlp_ratio,
                                 drop_path=drop_path[j],
                                 extra_norm=extra_norm_period > 0 and (j + 1) % extra_norm_period == 0,
                                 attn_impl=attn_impl, sequential=sequential, chunk_size=chunk_size,
                                 cpb_coords=cpb_coords)
            for j in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None
        self.grad_checkpointing = "none"

    def forward(self, x):
        for blk in self.blocks:
            if self.grad_checkpointing != "none" and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=self.grad_checkpointing != "torch")
            else:
                x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):  # (B, 3, H, W) -> (B, L, C)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _per_stage(name: str, value, n: int) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but depths has {n} stages")
    return values


class SwinTransformerV2(nn.Module):
    def __init__(self, img_size: int = 192, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 12, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, extra_norm_period: int = 0,
                 sequential_attn: Sequence[bool] | bool = False, attn_chunk_size: int = 16,
                 attn_impl: str = "sdpa", cpb_coords: str = "log"):
        super().__init__()
        n = len(depths)
        num_heads = _per_stage("num_heads", num_heads, n)
        pretrained_window_sizes = _per_stage("pretrained_window_sizes", pretrained_window_sizes, n)
        sequential_attn = _per_stage("sequential_attn", sequential_attn, n)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if cpb_coords not in CPB_COORDS:
            raise ValueError(f"cpb_coords must be one of {CPB_COORDS}, got {cpb_coords!r}")
        if any(sequential_attn) and attn_chunk_size < 1:
            raise ValueError(f"attn_chunk_size must be >= 1 when sequential_attn is on, got {attn_chunk_size}")
        if img_size % total_stride(patch_size, n):
            raise ValueError(f"img_size {img_size} must be divisible by patch_size * 2^(stages-1) "
                             f"= {total_stride(patch_size, n)}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (n - 1)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        # The modules' default inits would draw from the RNG; init_weights() draws everything afterwards,
        # so a normal build and a meta (or ZeRO-3 partitioned) build + init_module() on each module in
        # modules() order get identical weights from the same seed.
        with torch.random.fork_rng(devices=[]):
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
            self.layers = nn.ModuleList()
            sides = feature_map_sides(img_size, patch_size, n)
            for i in range(n):
                self.layers.append(BasicLayer(
                    embed_dim * 2 ** i, sides[i], depths[i], num_heads[i], window_size,
                    pretrained_window_sizes[i], mlp_ratio, drop_path[sum(depths[:i]):sum(depths[:i + 1])],
                    extra_norm_period, attn_impl, sequential_attn[i], attn_chunk_size, downsample=i < n - 1,
                    cpb_coords=cpb_coords))
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if holds_values(self.norm.weight):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Official init (see `init_module`) of every module in order, then the buffers. Same RNG draws in the
        same order whether the model was built normally or on the meta device and materialised with
        to_empty()."""
        for m in self.modules():
            init_module(m)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """Rebuild the shape-derived buffers (after to_empty(), or after a change of device)."""
        for m in self.modules():
            if isinstance(m, (WindowAttention, SwinTransformerBlock)):
                m.init_buffers()

    init_module = staticmethod(init_module)  # for engines that initialise a sharded build module by module

    def blocks(self) -> list[nn.Module]:
        return [blk for layer in self.layers for blk in layer.blocks]

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> layer id for layer-wise lr decay, the official fine-tuning rule
        (microsoft/Swin-Transformer `optimizer.py::get_swin_layer`): with L blocks in all, the patch embedding
        is 0, block j of stage i is sum(depths[:i]) + j + 1, the patch merging after a stage shares its last
        block's id, everything else (final norm, head) is L + 1."""
        ids = {name: 0 for name, _ in self.patch_embed.named_parameters(prefix="patch_embed")}
        first = 1
        for i, layer in enumerate(self.layers):
            for j, blk in enumerate(layer.blocks):
                ids.update({name: first + j for name, _ in blk.named_parameters(prefix=f"layers.{i}.blocks.{j}")})
            first += len(layer.blocks)
            if layer.downsample is not None:
                ids.update({name: first - 1 for name, _ in layer.downsample.named_parameters(
                    prefix=f"layers.{i}.downsample")})
        return {name: ids.get(name, first) for name, _ in self.named_parameters()}

    def set_grad_checkpointing(self, mode: str = "torch"):
        """Recompute each block in backward: "torch" (non-reentrant) or "torch_reentrant"; "none" is off."""
        if mode not in GRAD_CHECKPOINTING_MODES:
            raise ValueError(f"grad_checkpointing must be one of {GRAD_CHECKPOINTING_MODES}, got {mode!r}")
        for layer in self.layers:
            layer.grad_checkpointing = mode

    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, L, C) -> features (B, L_last, C_last) after the final norm."""
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.forward_tokens(self.patch_embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(1))


def checkpoint_filter_fn(state_dict: dict, model: SwinTransformerV2) -> dict:
    """Map a foreign state dict onto this model's (official) keys: unwraps `model`/`state_dict`, maps the
    layouts of timm and transformers and drops the buffers rebuilt for the target window (`layouts.to_official`;
    attn_mask is rebuilt here as attn_regions), strips a SimMIM `encoder.` prefix (dropping the decoder). A
    head whose shape differs from the model's (or a headless model) is dropped."""
    for key in ("model", "state_dict", "module"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    state_dict = layouts.to_official(state_dict)
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k == "mask_token" and "mask_token" not in own:
            continue
        if k.startswith("head.") and (k not in own or own[k].shape != v.shape):
            continue
        out[k] = v
    return out


def load_pretrained(model: SwinTransformerV2, state_dict: dict | str | Path):
    """Load a checkpoint in any known layout (official, SimMIM, timm, transformers), given as a state dict or
    as a path (a `.safetensors` or torch file, or a transformers folder; see `layouts.read_weights`).
    Everything but the head must match: unexpected keys or shape mismatches raise, a missing head is reported
    in the returned IncompatibleKeys."""
    if isinstance(state_dict, (str, Path)):
        state_dict = layouts.read_weights(state_dict)
    filtered = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    unexpected = sorted(set(filtered) - set(own))
    mismatched = sorted(k for k in filtered if k in own and own[k].shape != filtered[k].shape)
    missing = sorted(k for k in set(own) - set(filtered) if not k.startswith("head.") and k != "mask_token")
    if unexpected or mismatched or missing:
        raise ValueError(f"checkpoint does not fit the model: unexpected {unexpected[:5]}, "
                         f"shape mismatch {mismatched[:5]}, missing {missing[:5]}")
    return model.load_state_dict(filtered, strict=False)
