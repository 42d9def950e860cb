"""Triton side of :func:`~video2param.kernels.weighted_pool3d`: kernels, launchers, autograd.Function.

Imported only when a call dispatches to Triton (:mod:`._dispatch` decides), so ``import video2param``
never imports Triton. Importing this module without Triton installed raises ``ImportError``.

The op is memory bound: the forward kernel streams each window's ``V`` rows once with contiguous
channel vectors. The backward kernel is a *gather*: one program per input position visits the (at
most ``⌈k/s⌉`` per axis) windows that contain it, so there are no atomics and the gradients are
deterministic even for overlapping windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ._dispatch import LazyKernel, device_guard

if TYPE_CHECKING:
    from .pool3d import _Pool

__all__ = ["BWD", "FWD", "WeightedPool3dFunction", "launch_bwd", "launch_fwd"]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


def _pool3d_fwd_kernel(
    v_ptr, s_ptr, out_ptr, lse_ptr,
    n_out, C, T_out, H_out, W_out, inv_temp,
    stride_vb, stride_vt, stride_vh, stride_vw, stride_vc,
    stride_sb, stride_st, stride_sh, stride_sw,
    stride_ob, stride_ot, stride_oh, stride_ow, stride_oc,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    SOFTMAX: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """BLOCK_P output positions × BLOCK_C channels: Σ over each window of weight · V."""
    # Index math in int64 from the start: no overflow on large videos, and the interpreter skips
    # its (slow) overflow checks, which it applies to 32-bit integer arithmetic only.
    zero = tl.program_id(0).to(tl.int64) * 0
    pos = (zero + tl.program_id(0)) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pos < n_out
    s_t, s_h, s_w = zero + stride_st, zero + stride_sh, zero + stride_sw
    v_t, v_h, v_w = zero + stride_vt, zero + stride_vh, zero + stride_vw
    wo = pos % W_out
    rest = pos // W_out
    ho = rest % H_out
    rest = rest // H_out
    to = rest % T_out
    b = rest // T_out
    s_win = s_ptr + b * stride_sb + (to * ST) * s_t + (ho * SH) * s_h + (wo * SW) * s_w
    v_win = v_ptr + b * stride_vb + (to * ST) * v_t + (ho * SH) * v_h + (wo * SW) * v_w

    if SOFTMAX:  # window statistics from S alone (a few loads per window, cheap next to the V stream)
        m = tl.load(s_win, mask=p_mask, other=0.0).to(ACC_DTYPE) * inv_temp
        for i in tl.static_range(KT):
            for j in tl.static_range(KH):
                for k in tl.static_range(KW):
                    z = tl.load(s_win + i * s_t + j * s_h + k * s_w, mask=p_mask, other=0.0)
                    m = tl.maximum(m, z.to(ACC_DTYPE) * inv_temp)
        denom = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        for i in tl.static_range(KT):
            for j in tl.static_range(KH):
                for k in tl.static_range(KW):
                    z = tl.load(s_win + i * s_t + j * s_h + k * s_w, mask=p_mask, other=0.0)
                    denom += tl.exp(z.to(ACC_DTYPE) * inv_temp - m)
        if STORE_LSE:  # (B, T', H', W') contiguous, so the flat position is the index
            if tl.program_id(1) == 0:
                tl.store(lse_ptr + pos, m + tl.log(denom), mask=p_mask)

    cs = (zero + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    mask = p_mask[:, None] & c_mask[None, :]
    c_off = (cs * stride_vc)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
    for i in tl.static_range(KT):
        for j in tl.static_range(KH):
            for k in tl.static_range(KW):
                weight = tl.load(s_win + i * s_t + j * s_h + k * s_w, mask=p_mask, other=0.0).to(ACC_DTYPE)
                if SOFTMAX:
                    weight = tl.exp(weight * inv_temp - m) / denom
                v = tl.load((v_win + i * v_t + j * v_h + k * v_w)[:, None] + c_off, mask=mask, other=0.0)
                acc += weight[:, None] * v.to(ACC_DTYPE)
    o_row = out_ptr + b * stride_ob + to * stride_ot + ho * stride_oh + wo * stride_ow
    tl.store(o_row[:, None] + (cs * stride_oc)[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _pool3d_bwd_kernel(
    v_ptr, s_ptr, g_ptr, lse_ptr, delta_ptr, dv_ptr, ds_ptr,
    n_in, C, T, H, W, T_out, H_out, W_out, inv_temp,
    stride_vb, stride_vt, stride_vh, stride_vw, stride_vc,
    stride_sb, stride_st, stride_sh, stride_sw,
    stride_gb, stride_gt, stride_gh, stride_gw, stride_gc,
    stride_dvb, stride_dvt, stride_dvh, stride_dvw, stride_dvc,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    NT: tl.constexpr, NH: tl.constexpr, NW: tl.constexpr,
    SOFTMAX: tl.constexpr, NEED_DV: tl.constexpr, NEED_DS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """BLOCK_P input positions p: gather the output gradients of every window that contains p.

    With G = Σ_o c_o·g_o (c_o = 1 for "sum", the softmax weight of p in window o otherwise):
    dV[p] = S[p]·G ("sum") or G (softmax); dS[p] = V[p]·G ("sum") or (V[p]·G − Σ_o c_o·δ_o)/τ
    (softmax, δ_o = g_o·out_o). Each position has at most NT·NH·NW candidate windows.
    """
    zero = tl.program_id(0).to(tl.int64) * 0  # int64 index math: see the forward kernel
    pos = (zero + tl.program_id(0)) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pos < n_in
    g_t, g_h, g_w = zero + stride_gt, zero + stride_gh, zero + stride_gw
    w = pos % W
    rest = pos // W
    h = rest % H
    rest = rest // H
    t = rest % T
    b = rest // T
    s_p = tl.load(s_ptr + b * stride_sb + t * stride_st + h * stride_sh + w * stride_sw, mask=p_mask, other=0.0)
    s_p = s_p.to(ACC_DTYPE)
    v_row = v_ptr + b * stride_vb + t * stride_vt + h * stride_vh + w * stride_vw
    if NEED_DV:
        dv_row = dv_ptr + b * stride_dvb + t * stride_dvt + h * stride_dvh + w * stride_dvw
    g_b = g_ptr + b * stride_gb
    stat_b = b * T_out * H_out * W_out  # lse / delta are contiguous (B, T', H', W')

    ds_acc = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        cs = zero + c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        g_c_off = (cs * stride_gc)[None, :]
        grad_sum = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC_DTYPE)
        for i in tl.static_range(NT):
            ot = t // ST - i
            ok_t = (ot >= 0) & (ot < T_out) & (t - ot * ST < KT) & p_mask
            for j in tl.static_range(NH):
                oh = h // SH - j
                ok_h = ok_t & (oh >= 0) & (oh < H_out) & (h - oh * SH < KH)
                for k in tl.static_range(NW):
                    ow = w // SW - k
                    ok = ok_h & (ow >= 0) & (ow < W_out) & (w - ow * SW < KW)
                    if SOFTMAX:
                        lse = tl.load(lse_ptr + stat_b + (ot * H_out + oh) * W_out + ow, mask=ok, other=0.0)
                        coef = tl.where(ok, tl.exp(s_p * inv_temp - lse), 0.0)
                    else:
                        coef = tl.where(ok, 1.0, 0.0)
                    g = tl.load(
                        (g_b + ot * g_t + oh * g_h + ow * g_w)[:, None] + g_c_off,
                        mask=ok[:, None] & c_mask[None, :],
                        other=0.0,
                    )
                    grad_sum += coef[:, None] * g.to(ACC_DTYPE)
        mask = p_mask[:, None] & c_mask[None, :]
        if NEED_DV:
            dv = grad_sum if SOFTMAX else s_p[:, None] * grad_sum
            tl.store(dv_row[:, None] + (cs * stride_dvc)[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
        if NEED_DS:
            v = tl.load(v_row[:, None] + (cs * stride_vc)[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            ds_acc += tl.sum(v * grad_sum, axis=1)

    if NEED_DS:
        if SOFTMAX:
            corr = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
            for i in tl.static_range(NT):
                ot = t // ST - i
                ok_t = (ot >= 0) & (ot < T_out) & (t - ot * ST < KT) & p_mask
                for j in tl.static_range(NH):
                    oh = h // SH - j
                    ok_h = ok_t & (oh >= 0) & (oh < H_out) & (h - oh * SH < KH)
                    for k in tl.static_range(NW):
                        ow = w // SW - k
                        ok = ok_h & (ow >= 0) & (ow < W_out) & (w - ow * SW < KW)
                        idx = stat_b + (ot * H_out + oh) * W_out + ow
                        lse = tl.load(lse_ptr + idx, mask=ok, other=0.0)
                        delta = tl.load(delta_ptr + idx, mask=ok, other=0.0)
                        corr += tl.where(ok, tl.exp(s_p * inv_temp - lse) * delta, 0.0)
            ds_acc = (ds_acc - corr) * inv_temp
        tl.store(ds_ptr + pos, ds_acc.to(ds_ptr.dtype.element_ty), mask=p_mask)  # dS is contiguous


def _config(block_p: int, block_c: int, warps: int) -> object:
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps)


# (BLOCK_P, BLOCK_C, warps): wide channel vectors for LLM-sized C, more positions per program for small C.
FWD = LazyKernel(
    _pool3d_fwd_kernel,
    configs=lambda: [
        _config(p, c, w)
        for p, c, w in ((1, 1024, 4), (1, 2048, 8), (2, 1024, 8), (4, 512, 4), (8, 256, 4), (16, 128, 4), (32, 64, 4))
    ],
    interpret_config=lambda: _config(32, 16, 4),
    key=["C", "KT", "KH", "KW", "SOFTMAX"],
)
BWD = LazyKernel(
    _pool3d_bwd_kernel,
    configs=lambda: [
        _config(p, c, w) for p, c, w in ((1, 1024, 4), (2, 512, 4), (4, 256, 4), (4, 1024, 8), (8, 128, 4), (32, 64, 4))
    ],
    interpret_config=lambda: _config(32, 16, 4),
    key=["C", "KT", "KH", "KW", "ST", "SH", "SW", "SOFTMAX", "NEED_DV", "NEED_DS"],
)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _acc(V: torch.Tensor, S: torch.Tensor) -> tuple[torch.dtype, object]:
    wide = torch.float64 in (V.dtype, S.dtype)
    return (torch.float64, tl.float64) if wide else (torch.float32, tl.float32)


def launch_fwd(
    V: torch.Tensor, S: torch.Tensor, p: _Pool, *, out_dtype: torch.dtype, store_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, _, _, _, C = V.shape
    To, Ho, Wo = p.out_thw
    acc_torch, acc_tl = _acc(V, S)
    out = torch.empty(B, To, Ho, Wo, C, device=V.device, dtype=out_dtype)
    lse = torch.empty(B, To, Ho, Wo, device=V.device, dtype=acc_torch) if (store_lse and p.softmax) else None
    n_out = B * To * Ho * Wo
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))  # noqa: E731
    with device_guard(V):
        FWD[grid](
            V, S, out, lse,
            n_out, C, To, Ho, Wo, 1.0 / p.temperature,
            *V.stride(), *S.stride(), *out.stride(),
            KT=p.kernel[0], KH=p.kernel[1], KW=p.kernel[2],
            ST=p.stride[0], SH=p.stride[1], SW=p.stride[2],
            SOFTMAX=p.softmax, STORE_LSE=lse is not None, ACC_DTYPE=acc_tl,
        )  # fmt: skip
    return out, lse


def launch_bwd(
    V: torch.Tensor,
    S: torch.Tensor,
    grad: torch.Tensor,
    p: _Pool,
    lse: torch.Tensor | None,
    delta: torch.Tensor | None,
    *,
    need_v: bool,
    need_s: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, T, H, W, C = V.shape
    To, Ho, Wo = p.out_thw
    _, acc_tl = _acc(V, S)
    dV = torch.empty_like(V, memory_format=torch.contiguous_format) if need_v else None
    dS = torch.empty(S.shape, device=S.device, dtype=S.dtype) if need_s else None
    # Windows containing one input position, per axis: at most ceil(k / s).
    n_cand = tuple(-(-k // s) for k, s in zip(p.kernel, p.stride))
    dv_strides = dV.stride() if dV is not None else (0,) * 5
    n_in = B * T * H * W
    grid = lambda meta: (triton.cdiv(n_in, meta["BLOCK_P"]),)  # noqa: E731
    with device_guard(V):
        BWD[grid](
            V, S, grad, lse, delta, dV, dS,
            n_in, C, T, H, W, To, Ho, Wo, 1.0 / p.temperature,
            *V.stride(), *S.stride(), *grad.stride(), *dv_strides,
            KT=p.kernel[0], KH=p.kernel[1], KW=p.kernel[2],
            ST=p.stride[0], SH=p.stride[1], SW=p.stride[2],
            NT=n_cand[0], NH=n_cand[1], NW=n_cand[2],
            SOFTMAX=p.softmax, NEED_DV=need_v, NEED_DS=need_s, ACC_DTYPE=acc_tl,
        )  # fmt: skip
    return dV, dS


# --------------------------------------------------------------------------------------------------
# autograd.Function
# --------------------------------------------------------------------------------------------------


class WeightedPool3dFunction(torch.autograd.Function):
    """Triton forward/backward; use :func:`weighted_pool3d` (``apply(V, S, pool)`` takes checked args)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, V: torch.Tensor, S: torch.Tensor, pool: _Pool
    ) -> torch.Tensor:
        need_v, need_s = ctx.needs_input_grad[:2]
        # The softmax dS needs δ_o = g_o·out_o; keep out in the accumulation dtype for it.
        keep_out = pool.softmax and need_s
        acc_torch, _ = _acc(V, S)
        out, lse = launch_fwd(
            V, S, pool, out_dtype=acc_torch if keep_out else V.dtype, store_lse=need_v or need_s
        )
        ctx.save_for_backward(V, S, lse, out if keep_out else None)
        ctx.pool = pool
        return out.to(V.dtype) if keep_out else out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the Triton backward has no derivative of its own
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        V, S, lse, out_acc = ctx.saved_tensors
        need_v, need_s = ctx.needs_input_grad[:2]
        delta = None
        if out_acc is not None:
            delta = (grad.to(out_acc.dtype) * out_acc).sum(-1).contiguous()
        dV, dS = launch_bwd(V, S, grad, ctx.pool, lse, delta, need_v=need_v, need_s=need_s)
        return dV, dS, None
