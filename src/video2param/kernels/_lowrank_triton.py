"""Triton side of :func:`~video2param.kernels.lowrank_delta`: kernels, launchers, autograd.Function.

Imported only when a call dispatches to Triton (:mod:`._dispatch` decides), so ``import video2param``
never imports Triton. Importing this module without Triton installed raises ``ImportError``.

* ``_lowrank_fused_kernel`` — one Triton program owns ``BLOCK_M`` tokens of one sample: it shrinks
  them against ``Aᵢ`` into an fp32 ``BLOCK_M × r`` tile kept in registers, then expands that tile
  against ``Bᵢ`` tile by tile along ``d_out`` and adds ``base_out`` on the way out. The shrink
  result never touches memory. For decode (few token blocks) the ``d_out`` range is split over
  ``n_split`` programs that each redo the (cheap) shrink, so the whole GPU streams ``A`` and ``B``.
* ``_segment_outer_kernel`` — the backward reductions ``dA = s·(g B)ᵀ x`` and ``dB = s·gᵀ (x Aᵀ)``,
  summed over each sample's tokens without atomics (deterministic), split over tokens when there
  are few samples.
* :class:`LowRankDeltaFunction` — forward/backward; ``dx = s·(g B) A`` reuses the fused kernel with
  the roles of ``A`` and ``B`` swapped (transposed views, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import KernelBackendError, LazyKernel, device_guard, interpreting, num_sms
from .lowrank_delta import MAX_TRITON_RANK

__all__ = ["FUSED", "OUTER", "LowRankDeltaFunction", "Tokens", "launch_fused", "launch_outer"]

_MIN_DOT = 16  # tl.dot needs M, N, K >= 16 (K >= 16 for 16-bit inputs); enforced here, not by the interpreter


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


def _lowrank_fused_kernel(
    x_ptr, a_ptr, b_ptr, base_ptr, out_ptr, t_ptr,
    blk_sample_ptr, blk_start_ptr, blk_end_ptr,
    tokens_per_sample, blocks_per_sample,
    d_in, d_out, rank, scale, n_split,
    stride_xm, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_bn, stride_bo, stride_br,
    stride_basem, stride_baseo,
    stride_om, stride_oo,
    stride_tm, stride_tr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UNIFORM: tl.constexpr, HAS_BASE: tl.constexpr, STORE_T: tl.constexpr, DO_EXPAND: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[rows] = base[rows] + scale · (x[rows] Aₛᵀ) Bₛᵀ for one block of rows of one sample s."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Offsets in int64: no overflow on big activations, and the interpreter skips its slow
    # overflow checks (it only checks 32-bit integer arithmetic).
    zero = pid_m.to(tl.int64) * 0
    if UNIFORM:
        sample = pid_m // blocks_per_sample
        first = (zero + sample) * tokens_per_sample
        start = first + (zero + pid_m - sample * blocks_per_sample) * BLOCK_M
        end = first + tokens_per_sample
    else:  # packed tokens: the launcher's block table maps this program to (sample, rows)
        sample = tl.load(blk_sample_ptr + pid_m)
        start = tl.load(blk_start_ptr + pid_m)
        end = tl.load(blk_end_ptr + pid_m)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    ranks = zero + tl.arange(0, R_PAD)
    rank_mask = ranks < rank  # rank padded to a power of two >= 16 with zero rows of A / columns of B

    # Shrink: (BLOCK_M × d_in) · (d_in × R_PAD), accumulated in fp32 (fp64 for fp64) registers.
    ks = zero + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    a_ptrs = a_ptr + (zero + sample) * stride_an + ks[:, None] * stride_ak + ranks[None, :] * stride_ar
    x_step = (zero + stride_xk) * BLOCK_K
    a_step = (zero + stride_ak) * BLOCK_K
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, d_in, BLOCK_K):
        k_mask = ks < d_in - k0
        x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += x_step
        a_ptrs += a_step

    if STORE_T:  # the unscaled shrink, kept for the backward pass
        if pid_n == 0:
            tl.store(
                t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                acc.to(t_ptr.dtype.element_ty),
                mask=row_mask[:, None] & rank_mask[None, :],
            )

    if DO_EXPAND:
        # Tensor-core operand in the weights' dtype; the dot itself accumulates in ACC_DTYPE.
        shrunk = (acc * scale).to(b_ptr.dtype.element_ty)
        n_tiles = tl.cdiv(d_out, BLOCK_N)
        per_split = tl.cdiv(n_tiles, n_split)
        tile_lo = pid_n * per_split
        tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
        cols = (zero + tile_lo) * BLOCK_N + tl.arange(0, BLOCK_N)
        b_ptrs = b_ptr + (zero + sample) * stride_bn + ranks[:, None] * stride_br + cols[None, :] * stride_bo
        o_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oo
        b_step = (zero + stride_bo) * BLOCK_N
        o_step = (zero + stride_oo) * BLOCK_N
        if HAS_BASE:
            base_ptrs = base_ptr + rows[:, None] * stride_basem + cols[None, :] * stride_baseo
            base_step = (zero + stride_baseo) * BLOCK_N
        for _tile in range(tile_lo, tile_hi):
            col_mask = cols < d_out
            b_tile = tl.load(b_ptrs, mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
            res = tl.dot(shrunk, b_tile, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_BASE:
                res += tl.load(base_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
                base_ptrs += base_step
            tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)
            cols += BLOCK_N
            b_ptrs += b_step
            o_ptrs += o_step


def _segment_outer_kernel(
    p_ptr, q_ptr, out_ptr, seg_ptr,
    tokens_per_sample, rank, d, alpha, n_split,
    stride_pm, stride_pr,
    stride_qm, stride_qd,
    stride_os, stride_on, stride_or, stride_od,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    UNIFORM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[split, s] = alpha · Σ_{tokens of sample s in this split} P[tok, :r]ᵀ Q[tok, :d]."""
    seg = tl.program_id(0)
    pid_split = tl.program_id(2)
    zero = seg.to(tl.int64) * 0  # int64 offsets: see the fused kernel
    if UNIFORM:
        start = (zero + seg) * tokens_per_sample
        end = start + tokens_per_sample
    else:
        start = tl.load(seg_ptr + seg)
        end = tl.load(seg_ptr + seg + 1)
    length = tl.maximum(end - start, 0)
    chunk = tl.cdiv(tl.cdiv(length, BLOCK_M), n_split) * BLOCK_M
    lo = start + pid_split * chunk
    hi = tl.minimum(lo + chunk, end)

    ranks = zero + tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    cols = (zero + tl.program_id(1)) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    toks = lo + tl.arange(0, BLOCK_M)
    p_ptrs = p_ptr + ranks[:, None] * stride_pr + toks[None, :] * stride_pm
    q_ptrs = q_ptr + toks[:, None] * stride_qm + cols[None, :] * stride_qd
    p_step = (zero + stride_pm) * BLOCK_M
    q_step = (zero + stride_qm) * BLOCK_M
    acc = tl.zeros((R_PAD, BLOCK_D), dtype=ACC_DTYPE)
    for _m0 in range(lo, hi, BLOCK_M):
        tok_mask = toks < hi
        p_tile = tl.load(p_ptrs, mask=rank_mask[:, None] & tok_mask[None, :], other=0.0)
        q_tile = tl.load(q_ptrs, mask=tok_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(p_tile.to(q_tile.dtype), q_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        toks += BLOCK_M
        p_ptrs += p_step
        q_ptrs += q_step
    acc = acc * alpha
    o_ptrs = out_ptr + (zero + pid_split) * stride_os + (zero + seg) * stride_on
    tl.store(
        o_ptrs + ranks[:, None] * stride_or + cols[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=rank_mask[:, None] & col_mask[None, :],
    )


def _config(**kw: int) -> object:
    meta = {k: v for k, v in kw.items() if k.startswith("BLOCK")}
    for name, value in meta.items():
        assert value >= _MIN_DOT and value & (value - 1) == 0, f"{name}={value}: tl.dot needs a power of two >= 16"
    return triton.Config(meta, num_warps=kw.get("warps", 4), num_stages=kw.get("stages", 2))


def _fused_configs() -> list[object]:
    shapes = [(128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3),
              (64, 64, 4, 4), (128, 32, 4, 4), (256, 128, 8, 2), (64, 128, 4, 3)]  # fmt: skip
    return [_config(BLOCK_N=n, BLOCK_K=k, warps=w, stages=s) for n, k, w, s in shapes]


def _outer_configs() -> list[object]:
    shapes = [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (32, 64, 4, 4)]
    return [_config(BLOCK_M=m, BLOCK_D=d, warps=w, stages=s) for m, d, w, s in shapes]


FUSED = LazyKernel(
    _lowrank_fused_kernel,
    configs=_fused_configs,
    interpret_config=lambda: _config(BLOCK_N=32, BLOCK_K=32),
    key=["d_in", "d_out", "R_PAD", "BLOCK_M", "n_split", "HAS_BASE", "STORE_T", "DO_EXPAND"],
)
OUTER = LazyKernel(
    _segment_outer_kernel,
    configs=_outer_configs,
    interpret_config=lambda: _config(BLOCK_M=16, BLOCK_D=32),
    key=["d", "R_PAD", "n_split", "UNIFORM"],
)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _rank_pad(rank: int) -> int:
    if rank > MAX_TRITON_RANK:
        raise ValueError(f"rank {rank} exceeds the Triton kernel's limit {MAX_TRITON_RANK}; use the torch path")
    return max(_MIN_DOT, triton.next_power_of_2(rank))


def _acc_dtype(dtype: torch.dtype) -> object:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(t: torch.Tensor) -> str:
    # Match torch's own fp32 matmul policy so the Triton path is as exact as the reference it replaces.
    if t.dtype == torch.float32 and t.is_cuda and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class Tokens:
    """How the rows of a 2-D token matrix are split into samples, for the launchers."""

    total: int
    n: int
    segments: torch.Tensor | None  # clamped int64 offsets, or None for the uniform layout
    tokens: int  # tokens per sample when uniform

    @property
    def avg_tokens(self) -> int:
        return self.tokens if self.segments is None else -(-self.total // max(self.n, 1))


def _block_table(tok: Tokens, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Map program ids to (sample, first row, end row) for packed tokens — on device, no host sync.

    The grid is sized by the bound Σᵢ ⌈Lᵢ/BM⌉ ≤ ⌈total/BM⌉ + n; surplus programs get empty rows.
    """
    seg = tok.segments
    assert seg is not None
    lengths = (seg[1:] - seg[:-1]).clamp_min(0)
    blocks = (lengths + block_m - 1) // block_m
    cum = torch.cumsum(blocks, 0)
    bound = -(-tok.total // block_m) + tok.n
    pid = torch.arange(bound, device=seg.device, dtype=torch.int64)
    sample = torch.searchsorted(cum, pid, right=True)
    valid = sample < tok.n
    sample = sample.clamp_max(tok.n - 1)
    start = seg[sample] + (pid - (cum[sample] - blocks[sample])) * block_m
    end = seg[sample + 1]
    zero = torch.zeros((), dtype=torch.int64, device=seg.device)
    start = torch.where(valid, start, zero)
    end = torch.where(valid, end, zero)
    return sample.to(torch.int32), start.contiguous(), end.contiguous(), bound


def _pick_block_m(avg_tokens: int) -> int:
    if avg_tokens <= 16:
        return 16  # decode: one token per sample still needs M >= 16 for tl.dot; rows are masked
    if avg_tokens <= 32:
        return 32
    return 64


def launch_fused(
    x2: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    tok: Tokens,
    scale: float,
    *,
    base2: torch.Tensor | None = None,
    do_expand: bool = True,
    store_t: bool = False,
    n_split: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run the fused kernel: ``A`` is (1|n, r, K) and ``B`` is (1|n, N, r), any strides.

    Returns ``(out, T)``: ``out`` (total, N) in x's dtype when ``do_expand``; ``T = x Aᵀ``
    (total, r) in the accumulation dtype when ``store_t``.
    """
    total, d_in = x2.shape
    rank, d_out = A.shape[1], B.shape[1]
    assert A.shape[2] == d_in and B.shape[2] == rank
    if x2.dtype == torch.bfloat16 and interpreting():
        raise KernelBackendError(
            "bfloat16 tl.dot gives wrong numbers under TRITON_INTERPRET=1; test bfloat16 on a GPU "
            "or use float16/float32 with the interpreter"
        )
    r_pad = _rank_pad(rank)
    block_m = _pick_block_m(tok.avg_tokens)
    assert block_m >= _MIN_DOT and r_pad >= _MIN_DOT, "tl.dot needs M, N, K >= 16"
    acc_torch = torch.float64 if x2.dtype == torch.float64 else torch.float32
    out = torch.empty(total, d_out, device=x2.device, dtype=x2.dtype) if do_expand else None
    t_buf = torch.empty(total, rank, device=x2.device, dtype=acc_torch) if store_t else None
    if total == 0:
        if out is not None and base2 is not None:
            out.copy_(base2)
        return out, t_buf

    if tok.segments is None:
        blocks_per_sample = -(-tok.tokens // block_m)
        n_blocks = tok.n * blocks_per_sample
        table: tuple[torch.Tensor | None, ...] = (None, None, None)
    else:
        blocks_per_sample = 1
        sample, start, end, n_blocks = _block_table(tok, block_m)
        table = (sample, start, end)
    if n_split is None:
        # Enough programs to cover the GPU twice; the extra programs only redo the shrink.
        n_split = 1
        if do_expand:
            n_split = max(1, min((2 * num_sms(x2.device)) // max(n_blocks, 1), -(-d_out // 128)))
    n_split = max(1, int(n_split)) if do_expand else 1

    def stride0(t: torch.Tensor) -> int:  # a shared factor (leading dim 1) is read by every sample
        return 0 if t.shape[0] == 1 else t.stride(0)

    out_strides = out.stride() if out is not None else (0, 0)
    t_strides = t_buf.stride() if t_buf is not None else (0, 0)
    base_strides = base2.stride() if base2 is not None else (0, 0)
    grid = (n_blocks, n_split)
    with device_guard(x2):
        FUSED[grid](
            x2, A, B, base2, out, t_buf,
            table[0], table[1], table[2],
            tok.tokens, blocks_per_sample,
            d_in, d_out, rank, scale, n_split,
            x2.stride(0), x2.stride(1),
            stride0(A), A.stride(1), A.stride(2),
            stride0(B), B.stride(1), B.stride(2),
            base_strides[0], base_strides[1],
            out_strides[0], out_strides[1],
            t_strides[0], t_strides[1],
            R_PAD=r_pad, BLOCK_M=block_m,
            UNIFORM=tok.segments is None, HAS_BASE=base2 is not None,
            STORE_T=store_t, DO_EXPAND=do_expand,
            ACC_DTYPE=_acc_dtype(x2.dtype), DOT_PRECISION=_dot_precision(x2),
        )  # fmt: skip
    return out, t_buf


def launch_outer(
    P: torch.Tensor, Q: torch.Tensor, tok: Tokens, alpha: float, out: torch.Tensor, *, n_split: int | None = None
) -> torch.Tensor:
    """``out[s] = alpha · Σ_{tok ∈ s} P[tok]ᵀ Q[tok]`` written into ``out`` viewed as (n, r, d)."""
    total, rank = P.shape
    d = Q.shape[1]
    n_seg = out.shape[0]
    r_pad = _rank_pad(rank)
    if total == 0:
        return out.zero_()
    if n_split is None:
        programs = n_seg * -(-d // 128)
        longest = tok.total if n_seg == 1 else tok.avg_tokens
        n_split = max(1, min((2 * num_sms(Q.device)) // max(programs, 1), -(-longest // 256)))
    acc_torch = torch.float64 if Q.dtype == torch.float64 else torch.float32
    if n_split == 1:
        target = out.unsqueeze(0)
    else:  # deterministic split: per-split partial sums, reduced by torch afterwards
        target = torch.empty(n_split, *out.shape, device=Q.device, dtype=acc_torch)
    uniform = tok.segments is None
    grid = lambda meta: (n_seg, triton.cdiv(d, meta["BLOCK_D"]), n_split)  # noqa: E731
    with device_guard(Q):
        OUTER[grid](
            P, Q, target, tok.segments,
            tok.tokens, rank, d, alpha, n_split,
            P.stride(0), P.stride(1),
            Q.stride(0), Q.stride(1),
            target.stride(0), target.stride(1), target.stride(2), target.stride(3),
            R_PAD=r_pad, UNIFORM=uniform,
            ACC_DTYPE=_acc_dtype(Q.dtype), DOT_PRECISION=_dot_precision(Q),
        )  # fmt: skip
    if n_split > 1:
        out.copy_(target.sum(0))
    return out


# --------------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------------


class LowRankDeltaFunction(torch.autograd.Function):
    """Triton forward/backward on a packed ``(total, d_in)`` token matrix.

    Use :func:`lowrank_delta`; this class takes already-checked, normalised arguments:
    ``apply(x2, A, B, base2, scale, tok)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x2: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        base2: torch.Tensor | None,
        scale: float,
        tok: Tokens,
    ) -> torch.Tensor:
        need_b = ctx.needs_input_grad[2]
        out, shrunk = launch_fused(x2, A, B, tok, scale, base2=base2, store_t=need_b)
        ctx.save_for_backward(x2, A, B, shrunk)
        ctx.scale = scale
        ctx.tok = tok
        ctx.has_base = base2 is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the Triton backward has no derivative of its own
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        x2, A, B, shrunk = ctx.saved_tensors
        scale, tok = ctx.scale, ctx.tok
        need_x, need_a, need_b, need_base = ctx.needs_input_grad[:4]
        grad = grad if grad.dtype == x2.dtype else grad.to(x2.dtype)
        dx = dA = dB = None
        if need_x or need_a:
            # dx = s·(g B) A is the same fused op with the factors' roles swapped (transposed views);
            # its shrink g B is exactly what dA needs.
            dx, g_b = launch_fused(
                grad, B.transpose(1, 2), A.transpose(1, 2), tok, scale, do_expand=need_x, store_t=need_a
            )
            if need_a:
                dA = torch.empty_like(A, memory_format=torch.contiguous_format)
                launch_outer(g_b, x2, tok, scale, dA)
        if need_b:
            if shrunk is None:
                _, shrunk = launch_fused(x2, A, B, tok, scale, do_expand=False, store_t=True)
            dB = torch.empty_like(B, memory_format=torch.contiguous_format)
            # dBᵀ (r × d_out) = s·Σ (x Aᵀ)ᵀ g; a shared B sums over all tokens, i.e. one segment.
            b_tok = tok if B.shape[0] != 1 or tok.n == 1 else Tokens(tok.total, 1, None, tok.total)
            launch_outer(shrunk, grad, b_tok, scale, dB.transpose(1, 2))
        dbase = grad if (ctx.has_base and need_base) else None
        return dx, dA, dB, dbase, None, None
