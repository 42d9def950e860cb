"""lowrank_delta: the Triton kernels (run on CPU by Triton's interpreter) against the PyTorch reference.

The interpreter is switched on per test with ``monkeypatch.setenv`` — the kernels are ``triton.jit``-ed
lazily per mode, so this works whatever was imported before, and nothing leaks into other test files.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from kernel_compile_check import NO_TOOLS, run_isolated

import video2param.kernels as K
from video2param.kernels import _dispatch
from video2param.kernels import KernelBackendError, kernel_backend, lowrank_delta, lowrank_delta_reference
from video2param.kernels.lowrank_delta import MAX_TRITON_RANK
needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2), torch.float64: (1e-10, 1e-10)}


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton path and run it on CPU through the interpreter."""
    if not K.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "triton")


def _factors(n, r, d_in, d_out, dtype, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(n, r, d_in, generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(1 if shared else n, d_out, r, generator=g) / r**0.5).to(dtype)
    return A, B


def _graph_has(out: torch.Tensor, name: str) -> bool:
    """True when autograd node ``name`` is in ``out``'s graph (a few levels deep)."""
    todo, seen = [out.grad_fn], 0
    while todo and seen < 50:
        node = todo.pop()
        seen += 1
        if node is None:
            continue
        if type(node).__name__ == name:
            return True
        todo.extend(fn for fn, _ in node.next_functions)
    return False


def _compare(x, A, B, scale, base, segments, dtype):
    """Forward and all gradients of the Triton path against the reference (same upstream gradient)."""
    leaves = [t for t in (x, A, B, base) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = lowrank_delta(x, A, B, scale, base, segments)
    assert _graph_has(out, "LowRankDeltaFunctionBackward"), "the Triton path did not run"
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], B.shape[1])
    ref = lowrank_delta_reference(x, A, B, scale, base, segments)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for name, a, b in zip("x A B base".split(), got, want):
        assert a.shape == b.shape, name
        scale_ = b.abs().max().clamp_min(1.0)  # relative to the gradient's size
        torch.testing.assert_close(a / scale_, b / scale_, atol=atol, rtol=rtol, msg=f"grad {name}")


# ------------------------------------------------------------------ Triton vs reference (interpreter)


@pytest.mark.parametrize(
    "tokens,rank,dtype",
    [
        (1, 8, torch.float32),
        (15, 24, torch.float32),
        (16, 64, torch.float32),
        (17, 8, torch.float16),
        (1, 64, torch.float16),
        (17, 24, torch.float16),
    ],
)
def test_batched_matches_reference(interpreter, tokens, rank, dtype):
    n, d_in, d_out = 3, 40, 48  # widths not multiples of the 32-wide interpreter tiles
    A, B = _factors(n, rank, d_in, d_out, dtype)
    x = torch.randn(n, tokens, d_in).to(dtype)
    base = torch.randn(n, tokens, d_out).to(dtype)
    _compare(x, A, B, 0.75, base, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_B_without_base(interpreter, dtype):
    A, B = _factors(2, 24, 33, 70, dtype, shared=True, seed=1)
    x = torch.randn(2, 17, 33).to(dtype)
    _compare(x, A, B, 2.0, None, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_segments_match_reference(interpreter, dtype):
    # Uneven samples, one of them empty, one longer than a block.
    segments = torch.tensor([0, 1, 1, 18, 33], dtype=torch.int64)
    A, B = _factors(4, 8, 40, 36, dtype, seed=2)
    x = torch.randn(33, 40).to(dtype)
    base = torch.randn(33, 36).to(dtype)
    _compare(x, A, B, 0.5, base, segments, dtype)


def test_packed_segments_shared_B(interpreter):
    segments = torch.tensor([0, 5, 21], dtype=torch.int64)
    A, B = _factors(2, 24, 24, 40, torch.float32, shared=True, seed=3)
    _compare(torch.randn(21, 24), A, B, 1.5, None, segments, torch.float32)


def test_two_dim_x_single_sample(interpreter):
    A, B = _factors(1, 8, 20, 30, torch.float32, seed=4)
    _compare(torch.randn(19, 20), A, B, 1.0, torch.randn(19, 30), None, torch.float32)


def test_expanded_factors_are_read_in_place(interpreter):
    # The weight path passes A.expand(n, ...) (stride 0); the kernel must honour strides.
    A, B = _factors(1, 8, 20, 30, torch.float32, seed=5)
    x = torch.randn(3, 4, 20)
    out = lowrank_delta(x, A.expand(3, -1, -1), B.expand(3, -1, -1), 1.0)
    ref = lowrank_delta_reference(x, A.expand(3, -1, -1).contiguous(), B.expand(3, -1, -1).contiguous(), 1.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_split_output_and_split_reduction(interpreter):
    """The decode split (several programs per token block) and the split token reduction."""
    A, B = _factors(2, 24, 40, 100, torch.float32, seed=6)
    x = torch.randn(2, 3, 40)
    lt = importlib.import_module("video2param.kernels._lowrank_triton")  # the launchers, which need Triton
    tok = lt.Tokens(6, 2, None, 3)
    out, shrunk = lt.launch_fused(x.reshape(6, 40), A, B, tok, 0.5, store_t=True, n_split=3)
    ref = lowrank_delta_reference(x, A, B, 0.5).reshape(6, 100)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(shrunk, torch.bmm(x, A.transpose(1, 2)).reshape(6, 24), atol=2e-5, rtol=2e-5)

    q = torch.randn(6, 100)
    dst = torch.empty(2, 24, 100)
    lt.launch_outer(shrunk, q, lt.Tokens(6, 2, None, 3), 2.0, dst, n_split=3)
    want = 2.0 * torch.bmm(shrunk.reshape(2, 3, 24).transpose(1, 2), q.reshape(2, 3, 100))
    torch.testing.assert_close(dst, want, atol=2e-5, rtol=2e-5)


def test_gradcheck_float64(interpreter):
    A, B = _factors(2, 3, 5, 6, torch.float64, seed=7)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    base = torch.randn(2, 3, 6, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (x, A, B, base)]
    assert torch.autograd.gradcheck(lambda *a: lowrank_delta(*a[:3], 0.7, a[3]), args, fast_mode=True, atol=1e-7, rtol=1e-6)


def test_gradcheck_float64_packed_shared(interpreter):
    A, B = _factors(2, 3, 4, 5, torch.float64, shared=True, seed=8)
    x = torch.randn(5, 4, dtype=torch.float64)
    segments = torch.tensor([0, 2, 5])
    args = [t.requires_grad_(True) for t in (x, A, B)]
    assert torch.autograd.gradcheck(lambda *a: lowrank_delta(*a, 1.3, segments=segments), args, fast_mode=True, atol=1e-7, rtol=1e-6)


def test_base_out_is_not_modified_and_gets_the_upstream_gradient(interpreter):
    A, B = _factors(2, 8, 16, 16, torch.float32, seed=9)
    base = torch.randn(2, 3, 16, requires_grad=True)
    before = base.detach().clone()
    out = lowrank_delta(torch.randn(2, 3, 16), A, B, 1.0, base)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(base.detach(), before)
    assert torch.equal(base.grad, grad)


def test_bfloat16_is_refused_by_the_interpreter(interpreter):
    # bf16 tl.dot is silently wrong under TRITON_INTERPRET=1: a clear error instead of bad numbers.
    A, B = _factors(1, 8, 16, 16, torch.bfloat16)
    with pytest.raises(KernelBackendError, match="bfloat16"):
        lowrank_delta(torch.randn(1, 2, 16).bfloat16(), A, B, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 under the Triton interpreter is not faithful")
def test_bfloat16_on_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "auto")
    A, B = _factors(4, 64, 256, 320, torch.bfloat16, seed=10)
    x = torch.randn(4, 37, 256).to(torch.bfloat16)
    _compare(x.cuda(), A.cuda(), B.cuda(), 0.5, None, None, torch.bfloat16)


# ------------------------------------------------------------------ the reference itself


def test_reference_equals_materialised_delta_weights():
    """The spec against an independent formula: base + x (s·Bᵢ Aᵢ)ᵀ per sample."""
    A, B = _factors(3, 4, 10, 7, torch.float64, seed=11)
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    base = torch.randn(3, 5, 7, dtype=torch.float64)
    out = lowrank_delta_reference(x, A, B, 0.3, base)
    for i in range(3):
        torch.testing.assert_close(out[i], base[i] + x[i] @ (0.3 * B[i] @ A[i]).T)
    segments = torch.tensor([0, 5, 5, 15])
    packed = lowrank_delta_reference(x.reshape(15, 10), A, B[:1], 0.3, segments=segments)
    torch.testing.assert_close(packed[:5], x[0] @ (0.3 * B[0] @ A[0]).T)
    torch.testing.assert_close(packed[5:], x[1:].reshape(10, 10) @ (0.3 * B[0] @ A[2]).T)


def test_reference_bfloat16_rounds_once():
    A, B = _factors(2, 8, 32, 24, torch.float32, seed=12)
    x = torch.randn(2, 6, 32)
    exact = lowrank_delta_reference(x, A, B, 1.0)
    low = lowrank_delta_reference(x.bfloat16(), A.bfloat16(), B.bfloat16(), 1.0)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, atol=3e-2, rtol=3e-2)


def test_auto_dispatch_on_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("VIDEO2PARAM_KERNELS", raising=False)
    A, B = _factors(2, 8, 16, 16, torch.float32)
    x = torch.randn(2, 3, 16, requires_grad=True)
    assert kernel_backend(x, A, B) == "torch"
    out = lowrank_delta(x, A, B, 1.0)
    assert not _graph_has(out, "LowRankDeltaFunctionBackward")
    torch.testing.assert_close(out, lowrank_delta_reference(x, A, B, 1.0))


# ------------------------------------------------------------------ dispatch rules


def test_kernel_backend_modes(monkeypatch):
    cpu = torch.zeros(2)
    # Stand-ins for CUDA tensors: dispatch only looks at .is_cuda and .dtype.
    gpu16 = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    gpu64 = SimpleNamespace(is_cuda=True, dtype=torch.float64)
    monkeypatch.delenv("VIDEO2PARAM_KERNELS", raising=False)
    assert kernel_backend(gpu16, None, gpu16) == ("triton" if K.triton_available() else "torch")
    assert kernel_backend(gpu16, cpu) == "torch"  # mixed devices never go to Triton
    assert kernel_backend(gpu16, gpu64) == "torch"  # float64 stays on PyTorch under auto
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "torch")
    assert kernel_backend(cpu) == "torch"
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "AUTO")
    assert kernel_backend(cpu, None) == "torch"
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VIDEO2PARAM_KERNELS"):
        kernel_backend(cpu)


@needs_triton
def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET"):
        kernel_backend(torch.zeros(2))
    A, B = _factors(1, 8, 16, 16, torch.float32)
    with pytest.raises(KernelBackendError):
        lowrank_delta(torch.randn(1, 2, 16), A, B, 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(torch.zeros(2)) == "triton"


def test_without_triton_auto_falls_back_and_forced_raises(monkeypatch):
    # In-process stand-in for a machine without Triton; tests/test_kernels_optional_triton.py blocks the import.
    monkeypatch.setattr(_dispatch, "_triton_module", lambda: None)
    gpu16 = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "auto")
    assert kernel_backend(torch.zeros(2)) == "torch"
    assert kernel_backend(gpu16) == "torch"  # CUDA tensors fall back to the reference too
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "triton")
    with pytest.raises(KernelBackendError, match=r"not installed.*video2param\[cuda\]"):
        kernel_backend(torch.zeros(2))


def test_rank_above_kernel_limit(interpreter, monkeypatch):
    r = MAX_TRITON_RANK + 1
    A, B = _factors(1, r, 4, 4, torch.float32)
    x = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="exceeds the Triton kernel's limit"):
        lowrank_delta(x, A, B, 1.0)
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "auto")  # auto: such ranks use the reference
    torch.testing.assert_close(lowrank_delta(x, A, B, 1.0), lowrank_delta_reference(x, A, B, 1.0))


# ------------------------------------------------------------------ input errors


def _ok():
    A, B = _factors(2, 4, 8, 6, torch.float32)
    return torch.randn(2, 3, 8), A, B


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, A, B: (x[0, 0], A, B, {}), "x must be"),
        (lambda x, A, B: (x.int(), A, B, {}), "x must be float16"),
        (lambda x, A, B: (x, A[0], B, {}), "A must be"),
        (lambda x, A, B: (x, A, B[0], {}), "B must be"),
        (lambda x, A, B: (x[..., :7], A, B, {}), "d_in"),
        (lambda x, A, B: (x, A, B[..., :3], {}), "rank"),
        (lambda x, A, B: (x, A, torch.cat([B, B[:1]]), {}), "B must have 2 samples"),
        (lambda x, A, B: (x[:1], A, B, {}), "x has 1 samples"),
        (lambda x, A, B: (x, A.double(), B, {}), "A dtype"),
        (lambda x, A, B: (x, A, B.half(), {}), "B dtype"),
        (lambda x, A, B: (x, A.to("meta"), B, {}), "A is on meta"),
        (lambda x, A, B: (x, A, B, {"base_out": torch.zeros(2, 3, 5)}), "base_out must have shape"),
        (lambda x, A, B: (x, A, B, {"base_out": torch.zeros(2, 3, 6).double()}), "base_out dtype"),
        (lambda x, A, B: (x, A, B, {"base_out": torch.zeros(2, 3, 6, device="meta")}), "base_out is on meta"),
        (lambda x, A, B: (x, A, B, {"segments": torch.tensor([0, 3, 6])}), "only valid with packed 2-D x"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {}), "needs segments"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {"segments": torch.tensor([0, 6])}), "n\\+1=3"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {"segments": torch.tensor([0.0, 3.0, 6.0])}), "int64"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {"segments": torch.tensor([1, 3, 6])}), "start at 0"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {"segments": torch.tensor([0, 3, 5])}), "total_tokens=6"),
        (lambda x, A, B: (x.reshape(6, 8), A, B, {"segments": torch.tensor([0, 7, 6])}), "non-decreasing"),
        (lambda x, A, B: ("x", A, B, {}), "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    x, A, B, kw = mutate(*_ok())
    for fn in (lowrank_delta, lowrank_delta_reference):
        with pytest.raises(ValueError, match=match):
            fn(x, A, B, 1.0, **kw)


@pytest.mark.parametrize(
    "scale,match",
    [
        (torch.tensor(1.0, requires_grad=True), "must not require grad"),
        (torch.ones(2), "0-d tensor"),
        ("1.0", "python float"),
        (float("nan"), "finite"),
    ],
)
def test_bad_scale(scale, match):
    x, A, B = _ok()
    with pytest.raises(ValueError, match=match):
        lowrank_delta(x, A, B, scale)


def test_tensor_scale_is_accepted():
    x, A, B = _ok()
    torch.testing.assert_close(lowrank_delta(x, A, B, torch.tensor(0.5)), lowrank_delta_reference(x, A, B, 0.5))


# ------------------------------------------------------------------ GPU compilation, without a GPU


@pytest.mark.slow
@needs_triton
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """What the interpreter cannot check: the GPU compiler accepts the real launches (H100, sm_90).

    Compiled in a fresh process with an empty Triton cache: nothing the interpreter tests did to
    Triton in this process, and no cubin from an earlier run, can decide the outcome.
    """
    done = run_isolated("lowrank", tmp_path / "triton-cache")
    if done.returncode == NO_TOOLS:  # a Triton build without the bundled CUDA tools
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert set(report) == {"_lowrank_fused_kernel", "_segment_outer_kernel"}
    for name, seen in report.items():
        assert seen["wgmma"], f"{name}: the dots should use Hopper tensor cores"
        assert "STACK:0 " in seen["resources"], f"{name}: register spills: {seen['resources']}"
