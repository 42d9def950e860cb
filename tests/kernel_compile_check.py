"""Compile the kernels' real launches for sm_90 (H100) without a GPU, in a process of their own.

Run by the kernel tests as ``python tests/kernel_compile_check.py lowrank|pool3d`` with a clean
environment (no ``TRITON_INTERPRET``, a fresh ``TRITON_CACHE_DIR``): a full Triton compilation then
neither depends on what earlier tests did to Triton's state in the test process nor on cubins an
earlier run left in the on-disk cache. Prints one JSON object: per kernel, whether the PTX uses
Hopper tensor cores (``wgmma``) and the ``cuobjdump -res-usage`` line; exits with status 3 when this
Triton build lacks the bundled ``ptxas``/``cuobjdump``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

NO_TOOLS = 3


def run_isolated(op: str, cache_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run this script for ``op`` in a fresh interpreter, without Triton/kernel switches, cache in ``cache_dir``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIDEO2PARAM_KERNELS")}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, __file__, op], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _lowrank_launches() -> list[tuple[Any, tuple, dict]]:
    import torch

    from video2param.kernels import _aot
    from video2param.kernels import _lowrank_triton as lt

    x = torch.randn(128, 256).half()
    A = torch.randn(2, 64, 256).half()
    B = torch.randn(2, 512, 64).half()
    tok = lt.Tokens(128, 2, None, 64)
    with _aot.capture_launch(lt.FUSED) as fused, _aot.capture_launch(lt.OUTER) as outer:
        lt.launch_fused(x, A, B, tok, 0.5, base2=torch.randn(128, 512).half(), store_t=True)
        lt.launch_outer(torch.randn(128, 64), x, tok, 0.5, torch.empty(2, 64, 256))
    assert len(fused) == 1 and len(outer) == 1, (len(fused), len(outer))
    return [(lt.FUSED, *fused[0]), (lt.OUTER, *outer[0])]


def _pool3d_launches() -> list[tuple[Any, tuple, dict]]:
    import torch

    from video2param.kernels import _aot
    from video2param.kernels import _pool3d_triton as pt
    from video2param.kernels.pool3d import _check_inputs as pool_inputs

    V = torch.randn(1, 4, 6, 6, 512).bfloat16()
    S = torch.randn(1, 4, 6, 6).bfloat16()
    pool = pool_inputs(V, S, (2, 3, 3), (1, 2, 2), "window_softmax", 1.0)
    stats = torch.zeros(1, *pool.out_thw)
    with _aot.capture_launch(pt.FWD) as fwd, _aot.capture_launch(pt.BWD) as bwd:
        pt.launch_fwd(V, S, pool, out_dtype=torch.float32, store_lse=True)
        grad = torch.randn(1, *pool.out_thw, 512).bfloat16()
        pt.launch_bwd(V, S, grad, pool, stats, stats, need_v=True, need_s=True)
    assert len(fwd) == 1 and len(bwd) == 1, (len(fwd), len(bwd))
    return [(pt.FWD, *fwd[0]), (pt.BWD, *bwd[0])]


def main(op: str) -> int:
    from video2param.kernels import _aot

    launches = {"lowrank": _lowrank_launches, "pool3d": _pool3d_launches}[op]()
    report: dict[str, dict[str, Any]] = {}
    try:
        for kernel, args, kwargs in launches:
            compiled = _aot.compile_launch(kernel, args, kwargs, kernel.gpu_configs()[0], arch=90)
            report[kernel.fn.__name__] = {
                "wgmma": "wgmma" in compiled.asm["ptx"],
                "resources": _aot.resource_usage(compiled),
            }
    except FileNotFoundError as err:  # a Triton build without the bundled CUDA tools
        print(f"no bundled ptxas/cuobjdump: {err}", file=sys.stderr)
        return NO_TOOLS
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
