"""Fused kernels: Triton on CUDA, PyTorch references everywhere else.

``lowrank_delta`` applies per-sample low-rank weight deltas; ``weighted_pool3d`` is PPLLaVA's
prompt-guided 3D pooling. Each op has a PyTorch reference (the specification), a Triton kernel and
an ``autograd.Function``. Dispatch is decided per call by :func:`kernel_backend`: CUDA tensors with
Triton installed go to Triton, anything else to the reference; ``VIDEO2PARAM_KERNELS=triton|torch|auto``
forces a path (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``). Triton is the optional
``video2param[cuda]`` extra: importing this package never imports it; only a call that dispatches to
Triton does.
"""

from ._dispatch import ENV_VAR, KernelBackendError, kernel_backend, triton_available
from .lowrank_delta import lowrank_delta, lowrank_delta_reference
from .pool3d import weighted_pool3d, weighted_pool3d_reference

__all__ = [
    "ENV_VAR",
    "KernelBackendError",
    "kernel_backend",
    "lowrank_delta",
    "lowrank_delta_reference",
    "triton_available",
    "weighted_pool3d",
    "weighted_pool3d_reference",
]
