"""Compile a kernel launch for a GPU architecture without a GPU (a development and CI check).

The interpreter checks numerics but not what only the GPU compiler checks (types of loop-carried
values, tl.dot shape rules, register/shared-memory budgets). ``compile_launch`` takes the exact
arguments a launcher passed to a :class:`~video2param.kernels._dispatch.LazyKernel` and runs Triton's
full NVIDIA pipeline on them down to a cubin (Triton ships ``ptxas``), specialising arguments the
way the JIT does: integers equal to 1 become constants, 16-divisible integers and pointers get the
divisibility hint. Needs Triton (imported here, at the top: this module is a check, never imported by
the library itself).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import triton

from ._dispatch import LazyKernel

__all__ = ["capture_launch", "compile_launch", "resource_usage"]

_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


@contextmanager
def capture_launch(kernel: LazyKernel) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record the ``(args, kwargs)`` of every launch of ``kernel`` instead of running it."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    original = LazyKernel.__getitem__

    def record(self: LazyKernel, grid: Any) -> Any:
        if self is not kernel:
            return original(self, grid)
        return lambda *args, **kwargs: calls.append((args, kwargs))

    LazyKernel.__getitem__ = record  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        LazyKernel.__getitem__ = original  # type: ignore[method-assign]


def compile_launch(
    kernel: LazyKernel,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    config: Any,
    *,
    arch: int = 90,
) -> Any:
    """Compile one recorded launch with autotune ``config`` for ``sm_<arch>``; returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(kernel.fn)
    values = dict(zip(fn.arg_names, args))
    constants = {**kwargs, **config.kwargs}
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r}")
    source = ASTSource(fn, signature, constants, attrs)
    # FMA contraction stated explicitly: the JIT's current default, and it silences Triton 3.9's notice.
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled: Any) -> str:
    """``cuobjdump -res-usage`` of a compiled kernel (registers, spill stack, shared memory)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG:" in line)
