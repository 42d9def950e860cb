"""Backend selection and lazy Triton kernel construction shared by the kernel modules.

Two facts shape this module:

* Triton is optional (it does not exist on macOS/Windows), so nothing here imports it at module
  level without a guard, and the PyTorch references must keep working without it.
* ``triton.jit`` decides *at decoration time* whether a kernel is compiled for the GPU or run by the
  CPU interpreter (``TRITON_INTERPRET=1``). Kernels are therefore written as plain functions and
  decorated lazily, once per mode, the first time they are launched. That way the interpreter can be
  switched on by a test (``monkeypatch.setenv``) even when Triton — or this package — was imported
  earlier in the same process without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Literal, Sequence

import torch

try:  # Triton is a Linux-only dependency; everything else must import without it.
    import triton
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None  # type: ignore[assignment]

__all__ = [
    "ENV_VAR",
    "KernelBackendError",
    "LazyKernel",
    "backend_mode",
    "device_guard",
    "interpreting",
    "kernel_backend",
    "num_sms",
    "triton_available",
]

#: Environment variable that forces a kernel path; read at every call.
ENV_VAR = "VIDEO2PARAM_KERNELS"
_MODES = ("auto", "triton", "torch")

Backend = Literal["triton", "torch"]


class KernelBackendError(RuntimeError):
    """The Triton path was forced (``VIDEO2PARAM_KERNELS=triton``) but cannot run here."""


def triton_available() -> bool:
    """True when the ``triton`` package imported successfully."""
    return triton is not None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a truthy value right now (read live, like Triton)."""
    if triton is not None:
        try:  # Triton's own reading (3.4+), so the two can never disagree
            from triton import knobs

            return bool(knobs.runtime.interpret)
        except (ImportError, AttributeError):
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_mode() -> str:
    """The current value of :data:`ENV_VAR` (``auto`` when unset), validated."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def kernel_backend(*tensors: torch.Tensor | None) -> Backend:
    """Tell which path the kernels dispatch to for these tensors (``None`` entries are ignored).

    ``auto`` (default): ``"triton"`` when Triton imports and every tensor is on CUDA (and none is
    float64), else ``"torch"``.
    ``torch``: always the PyTorch reference. ``triton``: always Triton; raises
    :class:`KernelBackendError` when Triton is missing, or when a tensor is not on CUDA and the
    interpreter (``TRITON_INTERPRET=1``) is off — a forced path never silently falls back.
    """
    present = [t for t in tensors if t is not None]
    mode = backend_mode()
    if mode == "torch":
        return "torch"
    all_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "auto":
        # float64 is a checking dtype (gradcheck), not a performance one: leave it to PyTorch.
        wide = any(t.dtype == torch.float64 for t in present)
        return "triton" if (triton is not None and all_cuda and not wide) else "torch"
    if triton is None:
        raise KernelBackendError(
            f"{ENV_VAR}=triton but the 'triton' package is not installed "
            "(it is Linux-only); unset the variable to use the PyTorch path"
        )
    if not all_cuda and not interpreting():
        raise KernelBackendError(
            f"{ENV_VAR}=triton but the tensors are not all on CUDA; set TRITON_INTERPRET=1 to run the "
            "Triton kernels on CPU (slow, for tests) or unset the variable"
        )
    return "triton"


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for a launch; a no-op for CPU tensors (interpreter runs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small fixed number for CPU/interpreter runs)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


class LazyKernel:
    """A kernel function that is ``triton.jit``-ed (and autotuned) on first launch, once per mode.

    ``configs`` is the autotune list for the GPU; under the interpreter only ``interpret_config`` is
    used, because the interpreter cannot benchmark several configurations.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        configs: Callable[[], Sequence[Any]],
        interpret_config: Callable[[], Any],
        key: Sequence[str],
    ) -> None:
        self._fn = fn
        self._configs = configs
        self._interpret_config = interpret_config
        self._key = list(key)
        self._built: dict[bool, Any] = {}
        self._lock = threading.Lock()

    @property
    def fn(self) -> Callable[..., Any]:
        """The undecorated kernel function."""
        return self._fn

    def gpu_configs(self) -> list[Any]:
        """The autotune configurations used on a GPU."""
        return list(self._configs())

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.get()[grid]
        if not interpreting():
            return launch

        def interpreted(*args: Any, **kwargs: Any) -> Any:
            with _interpretable_stdlib():
                return launch(*args, **kwargs)

        return interpreted

    def get(self) -> Any:
        """The launchable (autotuned) kernel for the current interpreter mode."""
        if triton is None:
            raise KernelBackendError("triton is not installed")
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            with self._lock:
                kernel = self._built.get(mode)
                if kernel is None:
                    configs = [self._interpret_config()] if mode else list(self._configs())
                    kernel = triton.autotune(configs=configs, key=self._key)(triton.jit(self._fn))
                    self._built[mode] = kernel
        return kernel


_STDLIB_WRAPPERS: dict[int, Any] = {}


@contextlib.contextmanager
def _interpretable_stdlib():  # type: ignore[no-untyped-def]
    """Let an interpreted kernel call ``tl.zeros``, ``tl.sum``, ``tl.cdiv``, ...

    Those helpers are themselves ``@triton.jit`` functions, decorated when ``triton.language`` was
    first imported. If that happened without ``TRITON_INTERPRET=1`` they are compiled-mode objects
    that refuse to be called from interpreted code. For the duration of one interpreted launch we
    swap in interpreter versions of them — the same kind of scoped patching Triton's interpreter
    does to ``triton.language`` on every launch — and restore the originals afterwards.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import triton.language as tl_mod
    import triton.language.standard as std_mod

    swapped: list[tuple[object, str, Any]] = []
    try:
        for module in (tl_mod, std_mod):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    wrapper = _STDLIB_WRAPPERS.get(id(value))
                    if wrapper is None:
                        wrapper = _STDLIB_WRAPPERS[id(value)] = InterpretedFunction(value.fn)
                    swapped.append((module, name, value))
                    setattr(module, name, wrapper)
        yield
    finally:
        for module, name, value in reversed(swapped):
            setattr(module, name, value)
