"""The Triton kernels of GroupNorm+SiLU: two launches, statistics in float32 (Chan's merge).

    y = SiLU(GroupNorm(x)),  GroupNorm(x) = (x − μ_bg) / √(σ²_bg + eps) · γ_c + β_c

ldm.kernels.group_norm dispatches here (backend "triton"); this module imports Triton, so the
dispatcher imports it on its first Triton call, not with ldm. x is read twice, y written once,
rounded once. With one program per group (before the split below) the kernel ran 3.4x faster
than the torch path on an H100 (18 µs against 61 µs at (2, 320, 64, 64), float16).

Kernels. One program per (batch, group) leaves most of a GPU idle (SD: B·32 = 64 programs on
an H100's 132 SMs), so each group of n = C/G · S values is cut into `split` chunks, and the
work is two launches of B·G·split programs (about 512 in all):
    1. statistics: program (bg, j) reads chunk j and writes its count, mean and
       M2 = Σ(x − mean)², built block by block with Chan et al.'s (1979) pairwise merge
           δ = m_b − mean,  n' = n + n_b,  mean += δ·n_b/n',  M2 += M2_b + δ²·n·n_b/n'
       which never forms E[x²] − E[x]², so activations with a large mean keep their variance;
    2. normalise: program (bg, j) merges the group's `split` partials the same way, all at once
           μ = Σ n_j m_j / n,  M2 = Σ M2_j + Σ n_j (m_j − μ)²
       then rereads chunk j: y = (x − μ)·rstd·γ_c + β_c, y·sigmoid(y), stored in y's dtype.

Layouts, without copies: contiguous (B, C, *spatial), where a group is one run of n values, and
channels_last (B, C, H, W), where it is S runs of C/G values, C apart. A chunk walks the group
in memory order in both; other layouts are copied to contiguous first. y takes x's layout.

Shapes: x (B, C, *spatial), any number of spatial axes (none too); C divisible by G. Dtypes:
float16, bfloat16, float32. Forward only.

Axis letters: B batch, C channels, G groups, S spatial positions (h·w).
"""
import contextlib

import torch
import triton
import triton.language as tl

from ldm.kernels.checks import check_launchable


@triton.jit
def _group_stats(X, Stats, S, group_channels, group_size, chunk, G, stride_b, stride_c, stride_s,
                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    # -- program (b·G + g, j) owns values [j·chunk, (j+1)·chunk) of group g of sample b
    bg, j = tl.program_id(0), tl.program_id(1)
    first_channel = (bg % G) * group_channels
    # int64: B·C·S can pass 2^31 (the VAE at 1024²); offsets within one sample stay int32
    X += (bg // G).to(tl.int64) * stride_b + first_channel.to(tl.int64) * stride_c
    offs = tl.arange(0, BLOCK)

    # -- running count, mean and M2 = Σ(x − mean)², merged block by block (Chan et al.)
    n = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    end = tl.minimum(group_size, (j + 1) * chunk)
    for start in range(j * chunk, end, BLOCK):
        i = start + offs
        ok = i < end
        if CHANNELS_LAST:  # S runs of C/G channels, stride_s apart
            address = (i // group_channels) * stride_s + i % group_channels
        else:  # one run
            address = i
        x = tl.load(X + address, mask=ok, other=0.0).to(tl.float32)
        n_b = tl.minimum(end - start, BLOCK).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        m2_b = tl.sum(tl.where(ok, (x - mean_b) * (x - mean_b), 0.0), axis=0)
        delta = mean_b - mean
        n_new = n + n_b
        mean += delta * (n_b / n_new)
        m2 += m2_b + delta * delta * (n * (n_b / n_new))
        n = n_new

    # -- this chunk's (count, mean, M2), for the normalising kernel to merge
    Stats += (bg * tl.num_programs(1) + j) * 3
    tl.store(Stats, n)
    tl.store(Stats + 1, mean)
    tl.store(Stats + 2, m2)


@triton.jit
def _group_norm_apply(X, Y, Stats, W, Bias, S, group_channels, group_size, chunk, G, stride_b,
                      stride_c, stride_s, eps, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    bg, j = tl.program_id(0), tl.program_id(1)
    split = tl.num_programs(1)
    first_channel = (bg % G) * group_channels
    group_start = (bg // G).to(tl.int64) * stride_b + first_channel.to(tl.int64) * stride_c
    X += group_start
    Y += group_start  # y has x's strides

    # -- the group's statistics from its `split` partials: μ = Σ n_j m_j / n,
    #    M2 = Σ M2_j + Σ n_j (m_j − μ)² (every program of the group computes the same)
    part = tl.arange(0, SPLIT)
    have = part < split
    Stats += (bg * split + part) * 3
    n_j = tl.load(Stats, mask=have, other=0.0)
    mean_j = tl.load(Stats + 1, mask=have, other=0.0)
    mean = tl.sum(n_j * mean_j, axis=0) / group_size
    m2 = tl.sum(tl.load(Stats + 2, mask=have, other=0.0), axis=0) + \
        tl.sum(n_j * (mean_j - mean) * (mean_j - mean), axis=0)
    rstd = tl.math.rsqrt(m2 / group_size + eps)  # biased variance, as GroupNorm

    # -- normalise chunk j: per-channel affine, SiLU, store in y's dtype
    offs = tl.arange(0, BLOCK)
    end = tl.minimum(group_size, (j + 1) * chunk)
    for start in range(j * chunk, end, BLOCK):
        i = start + offs
        ok = i < end
        if CHANNELS_LAST:
            channel = i % group_channels
            address = (i // group_channels) * stride_s + channel
        else:
            channel = i // S
            address = i
        x = tl.load(X + address, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + first_channel + channel, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(Bias + first_channel + channel, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + address, y.to(Y.dtype.element_ty), mask=ok)


def group_norm_silu_triton(x, num_groups, weight, bias, eps, silu, split=None):
    """SiLU(GroupNorm(x)) (GroupNorm alone if not `silu`) by the two launches above.

    x: (B, C, *spatial) -> same shape, dtype and layout. weight, bias: (C,) or None.
    `split`: chunks per group (default: enough programs to fill the GPU).
    """
    check_launchable(x, _group_stats, "group norm")
    channels_last = _is_channels_last(x)
    if not channels_last:
        x = x.contiguous()
    B, C = x.shape[:2]
    S = x[0, 0].numel()  # spatial positions (1 for a (B, C) input)
    weight = x.new_ones(C) if weight is None else weight
    bias = x.new_zeros(C) if bias is None else bias
    y = torch.empty_like(x)  # keeps x's layout
    if y.numel() == 0:
        return y
    group_channels = C // num_groups
    group_size = group_channels * S
    block = min(4096, triton.next_power_of_2(group_size))
    split = split or _default_split(B * num_groups, group_size, block)
    chunk = triton.cdiv(triton.cdiv(group_size, split), block) * block  # whole blocks
    split = triton.cdiv(group_size, chunk)  # so that no chunk is empty
    stats = torch.empty(B * num_groups, split, 3, device=x.device, dtype=torch.float32)
    # Element strides of a sample, a channel and a spatial position.
    strides = (C * S, 1, C) if channels_last else (C * S, S, 1)
    shape = (S, group_channels, group_size, chunk, num_groups, *strides)
    grid = (B * num_groups, split)
    warps = max(4, min(16, block // 512))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _group_stats[grid](x, stats, *shape, CHANNELS_LAST=channels_last, BLOCK=block,
                           num_warps=warps)
        _group_norm_apply[grid](x, y, stats, weight, bias, *shape, eps, SILU=silu,
                                CHANNELS_LAST=channels_last, BLOCK=block,
                                SPLIT=triton.next_power_of_2(split), num_warps=warps)
    return y


def _is_channels_last(x):
    """A (B, C, H, W) tensor laid out channels_last, and not also plainly contiguous."""
    return (x.ndim == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


# Programs to aim for: about four per SM of an H100 (132 SMs). A fixed number, not a device
# query, keeps the launcher free of calls torch.compile cannot trace; on a smaller GPU it only
# makes the chunks smaller.
PROGRAMS = 512


def _default_split(groups, group_size, block):
    """Chunks per group: about PROGRAMS programs in all, each chunk at least one block."""
    return max(1, min(triton.cdiv(group_size, block), triton.cdiv(PROGRAMS, groups)))
