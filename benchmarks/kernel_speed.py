"""Time video2param's Triton kernels against their PyTorch counterparts on a CUDA GPU.

    python benchmarks/kernel_speed.py                         # markdown table on stdout
    python benchmarks/kernel_speed.py --output docs/benchmarks.md
    python benchmarks/kernel_speed.py --dtype float16 --quick

Reports, per shape: time (``triton.testing.do_bench``, median), achieved TFLOP/s and GB/s, percent of
the GPU's roofline (datasheet peaks, see ``PEAKS`` or ``--peak-tflops/--peak-gbps``) and the speedup
over the PyTorch path. Shapes follow the kernels' issue: ``lowrank_delta`` with d = 4096, r = 64 over
1…8192 tokens in 1…64 samples; ``weighted_pool3d`` at PPLLaVA's shape (32 frames × 24 × 24,
C = 4096, kernel = stride = (2, 3, 3)). Each case is checked against the reference before it is timed.

Without a CUDA device (or without triton) the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# Datasheet peaks: dense 16-bit tensor-core TFLOP/s and HBM GB/s, matched against the device name.
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 4800.0),
    "H100 NVL": (835.0, 3900.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.0, 3350.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100 80GB PCIe": (312.0, 1935.0),
    "A100": (312.0, 1555.0),  # 40 GB parts
    "L40S": (362.0, 864.0),
    "L4": (121.0, 300.0),
    "A10": (125.0, 600.0),
    "RTX 4090": (165.0, 1008.0),
}


@dataclass
class Gpu:
    name: str
    peak_tflops: float | None
    peak_gbps: float | None


@dataclass
class Row:
    cells: dict[str, str] = field(default_factory=dict)


@dataclass
class Goal:
    """One of the issue's performance targets and what this run measured."""

    name: str
    value: float
    target: float
    at_most: bool  # True: value must be <= target; False: value must be >= target
    unit: str

    def line(self) -> str:
        ok = self.value <= self.target if self.at_most else self.value >= self.target
        sign = "≤" if self.at_most else "≥"
        return (
            f"- {self.name}: **{self.value:.2f}{self.unit}** (goal {sign} {self.target:g}{self.unit}) — "
            f"{'met' if ok else 'NOT met'}"
        )


def _fail(msg: str) -> int:
    print(f"benchmarks/kernel_speed.py: {msg}", file=sys.stderr)
    return 2


def _gpu(args: argparse.Namespace) -> Gpu:
    name = torch.cuda.get_device_name()
    tflops = gbps = None
    for key, (t, g) in PEAKS.items():  # first match wins: specific names come before families
        if key.lower() in name.lower():
            tflops, gbps = t, g
            break
    return Gpu(name, args.peak_tflops or tflops, args.peak_gbps or gbps)


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (the first call, which autotunes, is not timed)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _table(rows: list[Row]) -> str:
    if not rows:
        return ""
    heads = list(rows[0].cells)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(r.cells.get(h, "") for h in heads) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ lowrank


def _bmm_path(x, A, B, scale, base):  # the plain PyTorch per-sample implementation it replaces
    return torch.baddbmm(base, torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2), alpha=scale)


def bench_lowrank(gpu: Gpu, dtype: torch.dtype, quick: bool, check: bool) -> tuple[list[Row], list[Goal]]:
    from video2param.kernels import lowrank_delta, lowrank_delta_reference

    d, r, scale = 4096, 64, 0.5
    shapes = [(1, 1), (8, 1), (32, 1), (64, 1), (1, 1024), (8, 1024), (64, 128), (1, 8192)]
    if quick:
        shapes = [(32, 1), (8, 1024)]
    W = torch.randn(d, d, device="cuda", dtype=dtype) / d**0.5
    rows: list[Row] = []
    goals: list[Goal] = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for n, L in shapes:
        x = torch.randn(n, L, d, device="cuda", dtype=dtype)
        A = torch.randn(n, r, d, device="cuda", dtype=dtype) / d**0.5
        B = torch.randn(n, d, r, device="cuda", dtype=dtype) / r**0.5
        base = F.linear(x, W)
        if check:
            got, want = lowrank_delta(x, A, B, scale, base), lowrank_delta_reference(x, A, B, scale, base)
            torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
        t_triton = _bench(lambda: lowrank_delta(x, A, B, scale, base))
        t_bmm = _bench(lambda: _bmm_path(x, A, B, scale, base))
        t_gemm = _bench(lambda: F.linear(x, W))
        t_layer = _bench(lambda: lowrank_delta(x, A, B, scale, F.linear(x, W)))
        tokens = n * L
        flops = 2.0 * tokens * r * (d + d)
        nbytes = elem * (tokens * d * 3 + 2 * n * r * d)  # x, base, out + A, B
        roof_ms = None
        if gpu.peak_tflops and gpu.peak_gbps:
            roof_ms = max(flops / (gpu.peak_tflops * 1e12), nbytes / (gpu.peak_gbps * 1e9)) * 1e3
        overhead = t_layer / t_gemm - 1.0
        rows.append(
            Row({
                "samples × tokens": f"{n} × {L}",
                "triton (ms)": f"{t_triton:.4f}",
                "TFLOP/s": f"{flops / t_triton / 1e9:.1f}",
                "GB/s": f"{nbytes / t_triton / 1e6:.0f}",
                "% roofline": _fmt(None if roof_ms is None else 100 * roof_ms / t_triton, ".0f", "%"),
                "torch bmm (ms)": f"{t_bmm:.4f}",
                "speedup": f"{t_bmm / t_triton:.2f}×",
                "base GEMM (ms)": f"{t_gemm:.4f}",
                "GEMM + delta (ms)": f"{t_layer:.4f}",
                "added to GEMM": f"{100 * overhead:+.1f}%",
            })
        )  # fmt: skip
        if (n, L) == (8, 1024):
            goals.append(Goal("lowrank_delta added to the base GEMM, 8 × 1024 tokens", 100 * overhead, 15, True, "%"))
        if (n, L) == (32, 1):
            goals.append(Goal("lowrank_delta speedup over bmm, decode, 32 samples", t_bmm / t_triton, 2, False, "×"))
    return rows, goals


# ------------------------------------------------------------------------------------------- pool3d


def pool3d_unfold(V, S, kernel, stride, mode="sum", temperature=1.0):
    """The straightforward PyTorch version: unfold windows into a copy, weight, sum."""
    (kt, kh, kw), (st, sh, sw) = kernel, stride
    win = V.permute(0, 4, 1, 2, 3).unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)  # B,C,T',H',W',kt,kh,kw
    win = win.flatten(-3)
    s = S.unfold(1, kt, st).unfold(2, kh, sh).unfold(3, kw, sw).flatten(-3)  # B,T',H',W',K
    if mode == "window_softmax":
        s = torch.softmax(s.float() / temperature, dim=-1).to(V.dtype)
    return (win * s.unsqueeze(1)).sum(-1).permute(0, 2, 3, 4, 1)


def bench_pool3d(gpu: Gpu, dtype: torch.dtype, quick: bool, check: bool) -> tuple[list[Row], list[Goal]]:
    from video2param.kernels import weighted_pool3d, weighted_pool3d_reference

    cases = [
        ("PPLLaVA 1×32×24×24, C=4096", (1, 32, 24, 24, 4096), (2, 3, 3), (2, 3, 3)),
        ("overlapping, stride (1,2,2)", (1, 32, 24, 24, 4096), (2, 3, 3), (1, 2, 2)),
        ("batch 8×16×24×24, C=1024", (8, 16, 24, 24, 1024), (2, 3, 3), (2, 3, 3)),
    ]
    if quick:
        cases = cases[:1]
    rows: list[Row] = []
    goals: list[Goal] = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for label, shape, kernel, stride in cases:
        V = torch.randn(*shape, device="cuda", dtype=dtype)
        S = torch.rand(*shape[:4], device="cuda", dtype=dtype)
        for mode in ("sum", "window_softmax"):
            out = weighted_pool3d(V, S, kernel, stride, mode)
            if check:
                ref = weighted_pool3d_reference(V, S, kernel, stride, mode)
                torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
            t_triton = _bench(lambda: weighted_pool3d(V, S, kernel, stride, mode))
            t_unfold = _bench(lambda: pool3d_unfold(V, S, kernel, stride, mode))
            nbytes = elem * (V.numel() + S.numel() + out.numel())
            gbps = nbytes / t_triton / 1e6
            pct = None if gpu.peak_gbps is None else 100 * gbps / gpu.peak_gbps

            Vg, Sg = V.detach().requires_grad_(True), S.detach().requires_grad_(True)
            grad = torch.randn_like(out)

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(Vg, Sg, kernel, stride, mode), (Vg, Sg), grad)

            t_train = _bench(fwd_bwd(weighted_pool3d))
            t_train_ref = _bench(fwd_bwd(weighted_pool3d_reference))
            rows.append(
                Row({
                    "case": label,
                    "mode": mode,
                    "fwd triton (ms)": f"{t_triton:.4f}",
                    "GB/s": f"{gbps:.0f}",
                    "% HBM peak": _fmt(pct, ".0f", "%"),
                    "fwd unfold (ms)": f"{t_unfold:.4f}",
                    "speedup": f"{t_unfold / t_triton:.1f}×",
                    "fwd+bwd triton (ms)": f"{t_train:.4f}",
                    "fwd+bwd reference (ms)": f"{t_train_ref:.4f}",
                })
            )  # fmt: skip
            if label.startswith("PPLLaVA") and mode == "sum":
                if pct is not None:
                    goals.append(Goal("weighted_pool3d forward, share of HBM peak", pct, 70, False, "%"))
                goals.append(Goal("weighted_pool3d forward speedup over unfold", t_unfold / t_triton, 5, False, "×"))
    return rows, goals


# --------------------------------------------------------------------------------------------- main


def _report(gpu: Gpu, dtype: torch.dtype, sections: list[tuple[str, list[Row]]], goals: list[Goal]) -> str:
    import triton

    peaks = (
        f"{gpu.peak_tflops:.0f} TFLOP/s dense 16-bit, {gpu.peak_gbps:.0f} GB/s HBM"
        if gpu.peak_tflops and gpu.peak_gbps
        else "unknown (pass --peak-tflops/--peak-gbps)"
    )
    out = [
        "# Kernel benchmarks",
        "",
        f"- GPU: **{gpu.name}** (roofline from datasheet peaks: {peaks})",
        f"- dtype {str(dtype).removeprefix('torch.')}; torch {torch.__version__}, triton {triton.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}",
        "- times: `triton.testing.do_bench`, median ms; generated by `python benchmarks/kernel_speed.py`",
        "",
    ]
    for title, rows in sections:
        out += [f"## {title}", "", _table(rows), ""]
    if goals:
        out += ["## Goals (H100 targets from the kernels' issue)", ""]
        out += [goal.line() for goal in goals]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check before timing")
    parser.add_argument("--output", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's dense 16-bit peak")
    parser.add_argument("--peak-gbps", type=float, help="override the GPU's HBM bandwidth peak")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        return _fail("no CUDA device is available; these benchmarks time the Triton kernels on a GPU. Nothing was run.")
    try:
        import triton  # noqa: F401
        import triton.testing  # noqa: F401
    except ImportError:
        return _fail("triton is not installed: pip install 'video2param[cuda]' (Linux with an NVIDIA GPU).")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _fail("TRITON_INTERPRET is set; unset it so the kernels are compiled for the GPU.")
    os.environ["VIDEO2PARAM_KERNELS"] = "auto"  # CUDA tensors → Triton, whatever the caller's shell says

    src = Path(__file__).resolve().parents[1] / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))  # run from a checkout without installing
    from video2param.kernels import kernel_backend

    dtype = getattr(torch, args.dtype)
    probe = torch.zeros(1, device="cuda", dtype=dtype)
    if kernel_backend(probe) != "triton":
        return _fail("dispatch does not pick Triton for CUDA tensors here; nothing to compare.")

    gpu = _gpu(args)
    lr_rows, lr_goals = bench_lowrank(gpu, dtype, args.quick, not args.no_check)
    pool_rows, pool_goals = bench_pool3d(gpu, dtype, args.quick, not args.no_check)
    report = _report(
        gpu,
        dtype,
        [
            ("lowrank_delta (d_in = d_out = 4096, r = 64, distinct A and B per sample)", lr_rows),
            ("weighted_pool3d (kernel (2,3,3))", pool_rows),
        ],
        lr_goals + pool_goals,
    )
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
