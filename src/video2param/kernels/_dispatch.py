"""Backend selection and lazy Triton kernel construction shared by the kernel modules.

Three facts shape this module:

* Triton is optional (the ``video2param[cuda]`` extra; it does not exist on macOS/Windows and is
  ~1 GB of no use on a CPU-only machine). Nothing imports it until a call actually dispatches to
  Triton, so ``import video2param`` never does, and the PyTorch references work without it.
* ``triton.jit`` decides *at decoration time* whether a kernel is compiled for the GPU or run by the
  CPU interpreter (``TRITON_INTERPRET=1``). Kernels are therefore written as plain functions and
  decorated lazily, once per mode, the first time they are launched. That way the interpreter can be
  switched on by a test (``monkeypatch.setenv``) even when Triton — or this package — was imported
  earlier in the same process without it.
* Triton's interpreter patches ``triton.language`` while it runs and does not undo all of it (see
  :func:`_interpretable_stdlib`); an interpreted launch here leaves the language as it found it, so a
  later compiled launch in the same process still works.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Literal, Sequence

import torch

__all__ = [
    "ENV_VAR",
    "KernelBackendError",
    "LazyKernel",
    "backend_mode",
    "device_guard",
    "interpreting",
    "kernel_backend",
    "num_sms",
    "require_triton",
    "triton_available",
]

#: Environment variable that forces a kernel path; read at every call.
ENV_VAR = "VIDEO2PARAM_KERNELS"
_MODES = ("auto", "triton", "torch")

Backend = Literal["triton", "torch"]


class KernelBackendError(RuntimeError):
    """The Triton path was forced (``VIDEO2PARAM_KERNELS=triton``) but cannot run here."""


#: What to install for the Triton kernels; named by every error about a missing Triton.
INSTALL_HINT = "pip install 'video2param[cuda]'"

_triton: ModuleType | None = None
_triton_error: str | None = None  # why importing Triton failed, once it has


def _triton_module() -> ModuleType | None:
    """Triton, imported on first need; ``None`` when it cannot be imported (the result is kept)."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            import triton
        except ImportError as err:
            _triton_error = str(err) or type(err).__name__
        else:
            _triton = triton
    return _triton


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (this imports it, once)."""
    return _triton_module() is not None


def require_triton(why: str = "the Triton kernels need it") -> ModuleType:
    """Return the ``triton`` module, or raise :class:`KernelBackendError` naming the extra to install."""
    module = _triton_module()
    if module is None:
        raise KernelBackendError(
            f"Triton is not installed ({_triton_error or 'it does not import'}), but {why}. Install it with {INSTALL_HINT} "
            f"(Linux with an NVIDIA GPU), or unset {ENV_VAR} to use the PyTorch path"
        )
    return module


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a truthy value right now (read live, like Triton)."""
    if sys.modules.get("triton") is not None:  # never import Triton just to answer this
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

    ``auto`` (default): ``"triton"`` when every tensor is on CUDA (and none is float64) and Triton
    imports, else ``"torch"``; CPU tensors never import Triton.
    ``torch``: always the PyTorch reference. ``triton``: always Triton; raises
    :class:`KernelBackendError` when Triton is missing (naming ``video2param[cuda]``), or when a
    tensor is not on CUDA and the interpreter (``TRITON_INTERPRET=1``) is off — a forced path never
    silently falls back.
    """
    present = [t for t in tensors if t is not None]
    mode = backend_mode()
    if mode == "torch":
        return "torch"
    all_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "auto":
        # float64 is a checking dtype (gradcheck), not a performance one: leave it to PyTorch.
        wide = any(t.dtype == torch.float64 for t in present)
        if not all_cuda or wide:
            return "torch"
        return "triton" if _triton_module() is not None else "torch"
    require_triton(f"{ENV_VAR}=triton forces the Triton kernels")
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
        triton = require_triton()
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
    """Let an interpreted kernel call ``tl.zeros``, ``tl.sum``, ``tl.cdiv``, ...; undo it all afterwards.

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

    with _language_restored():
        for module in (tl_mod, std_mod):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    wrapper = _STDLIB_WRAPPERS.get(id(value))
                    if wrapper is None:
                        wrapper = _STDLIB_WRAPPERS[id(value)] = InterpretedFunction(value.fn)
                    setattr(module, name, wrapper)
        yield


_MISSING = object()


def _language_namespaces() -> list[Any]:
    """The ``triton.language`` modules and their classes: everything the interpreter patches."""
    modules = [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "triton.language" or name.startswith("triton.language."))
    ]
    classes: dict[int, type] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, type) and str(getattr(value, "__module__", "")).startswith("triton.language"):
                classes[id(value)] = value
    return [*modules, *classes.values()]


@contextlib.contextmanager
def _language_restored():  # type: ignore[no-untyped-def]
    """Put every attribute of ``triton.language`` (modules and classes) back as it was on entry.

    Triton's interpreter swaps interpreter versions into ``triton.language`` for each launch. The
    launch itself restores what it swapped, but a jit helper called from an interpreted kernel
    (``tl.sum``, ``tl.cdiv`` ...: ``InterpretedFunction.__call__``) patches the modules it sees —
    ``triton.language.core`` among them — and never restores them. Left like that, a later *compiled*
    launch or ``triton.compile`` in the same process fails (``'value' object has no attribute
    'dtype'``). Names added to modules (submodules imported meanwhile) are kept; names added to
    classes are removed.
    """
    saved = [(space, dict(vars(space))) for space in _language_namespaces()]
    try:
        yield
    finally:
        for space, before in saved:
            now = vars(space)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(space, name, value)
            if isinstance(space, type):
                for name in [n for n in list(now) if n not in before]:
                    delattr(space, name)
