"""weighted_pool3d: the Triton kernels (run on CPU by Triton's interpreter) against the PyTorch reference.

The interpreter is switched on per test with ``monkeypatch.setenv`` (kernels are jit-ed lazily per mode),
so nothing leaks into other test files and import order does not matter.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from kernel_compile_check import NO_TOOLS, run_isolated

import video2param.kernels as K
from video2param.kernels import kernel_backend, weighted_pool3d, weighted_pool3d_reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton path and run it on CPU through the interpreter."""
    if not K.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "triton")


def _inputs(shape, dtype, s_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(*shape, generator=g).to(dtype)
    S = torch.randn(*shape[:4], generator=g).to(s_dtype or dtype)
    return V, S


def _compare(V, S, kernel, stride, mode, temperature=1.0):
    """Forward and both gradients of the Triton path against the reference (same upstream gradient)."""
    V.requires_grad_(True)
    S.requires_grad_(True)
    out = weighted_pool3d(V, S, kernel, stride, mode, temperature)
    assert type(out.grad_fn).__name__ == "WeightedPool3dFunctionBackward", "the Triton path did not run"
    ref = weighted_pool3d_reference(V, S, kernel, stride, mode, temperature)
    assert out.shape == ref.shape and out.dtype == V.dtype
    atol, rtol = TOL[V.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (V, S), grad)
    want = torch.autograd.grad(ref, (V, S), grad)
    for name, a, b in zip(("V", "S"), got, want):
        assert a.dtype == b.dtype, name
        size = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / size, b / size, atol=atol, rtol=rtol, msg=f"grad {name}")
    return out


# ------------------------------------------------------------------ Triton vs reference (interpreter)

CASES = [
    # (shape (B,T,H,W,C), kernel, stride) — C never a multiple of the 16-wide interpreter block
    pytest.param((1, 4, 6, 7, 20), (2, 3, 3), None, id="ppllava-kernel-ragged-edges"),
    pytest.param((2, 3, 5, 5, 33), (2, 3, 2), (1, 2, 1), id="overlapping"),
    pytest.param((1, 1, 4, 5, 17), (1, 2, 2), (1, 1, 3), id="single-frame"),
    pytest.param((1, 2, 5, 6, 1), (1, 2, 2), (1, 3, 3), id="stride-gaps-C1"),
]


@pytest.mark.parametrize("shape,kernel,stride", CASES)
@pytest.mark.parametrize("mode", ["sum", "window_softmax"])
def test_matches_reference_float32(interpreter, shape, kernel, stride, mode):
    V, S = _inputs(shape, torch.float32)
    _compare(V, S, kernel, stride, mode, temperature=0.7)


@pytest.mark.parametrize("mode", ["sum", "window_softmax"])
def test_matches_reference_float16(interpreter, mode):
    V, S = _inputs((1, 2, 6, 6, 24), torch.float16, seed=1)
    _compare(V, S, (2, 3, 3), (1, 2, 2), mode, temperature=2.0)


def test_half_features_with_float32_scores(interpreter):
    V, S = _inputs((1, 2, 3, 6, 20), torch.float16, torch.float32, seed=2)
    out = _compare(V, S, (2, 3, 3), None, "window_softmax", temperature=0.5)
    assert out.dtype == torch.float16


def test_bfloat16_loads_are_upcast(interpreter):
    # The pooling kernels upcast right after each load, so bf16 is valid under the interpreter.
    V, S = _inputs((1, 2, 6, 6, 20), torch.bfloat16, seed=11)
    _compare(V, S, (2, 3, 3), None, "window_softmax")


def test_uncovered_positions_get_zero_gradient(interpreter):
    # H=6 with kernel 2, stride 3: windows cover rows 0-1 and 3-4; rows 2 and 5 are in none.
    V, S = _inputs((1, 1, 6, 4, 3), torch.float32, seed=3)
    V.requires_grad_(True)
    S.requires_grad_(True)
    weighted_pool3d(V, S, (1, 2, 2), (1, 3, 2)).sum().backward()
    for row in (2, 5):
        assert torch.all(V.grad[:, :, row] == 0) and torch.all(S.grad[:, :, row] == 0)
    for row in (0, 1, 3, 4):
        assert torch.all(V.grad[:, :, row] != 0) and torch.all(S.grad[:, :, row] != 0)


@pytest.mark.parametrize("stride", [None, (1, 1, 1)], ids=["disjoint", "overlapping"])
def test_backward_is_deterministic(interpreter, stride):
    V, S = _inputs((1, 2, 4, 4, 5), torch.float32, seed=4)
    grad = torch.randn(weighted_pool3d_reference(V, S, (2, 2, 2), stride).shape)
    runs = []
    for _ in range(2):
        v, s = V.clone().requires_grad_(True), S.clone().requires_grad_(True)
        weighted_pool3d(v, s, (2, 2, 2), stride, "window_softmax").backward(grad)
        runs.append((v.grad, s.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("mode", ["sum", "window_softmax"])
def test_gradcheck_float64(interpreter, mode):
    V, S = _inputs((1, 2, 3, 3, 3), torch.float64, seed=5)
    V.requires_grad_(True)
    S.requires_grad_(True)
    fn = lambda v, s: weighted_pool3d(v, s, (2, 2, 2), (1, 1, 1), mode, 0.8)  # noqa: E731 - overlapping
    assert torch.autograd.gradcheck(fn, (V, S), fast_mode=True, atol=1e-7, rtol=1e-6)


def test_only_one_input_requires_grad(interpreter):
    V, S = _inputs((1, 2, 3, 3, 4), torch.float32, seed=6)
    S.requires_grad_(True)
    weighted_pool3d(V, S, (2, 3, 3), mode="window_softmax").sum().backward()
    V2, S2 = V.clone(), S.detach().clone().requires_grad_(True)
    weighted_pool3d_reference(V2, S2, (2, 3, 3), mode="window_softmax").sum().backward()
    torch.testing.assert_close(S.grad, S2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bfloat16_on_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("VIDEO2PARAM_KERNELS", "auto")
    V, S = _inputs((2, 8, 12, 12, 200), torch.bfloat16, seed=7)
    _compare(V.cuda(), S.cuda(), (2, 3, 3), None, "window_softmax")


# ------------------------------------------------------------------ the reference itself


def test_reference_sum_of_ones_is_box_pooling():
    V, _ = _inputs((2, 4, 6, 6, 3), torch.float64, seed=8)
    S = torch.ones(V.shape[:4], dtype=torch.float64)
    out = weighted_pool3d_reference(V, S, (2, 3, 3), (1, 2, 3))
    box = F.avg_pool3d(V.permute(0, 4, 1, 2, 3), (2, 3, 3), (1, 2, 3)) * 18
    torch.testing.assert_close(out, box.permute(0, 2, 3, 4, 1))


def test_reference_softmax_of_constant_scores_is_average_pooling():
    V, _ = _inputs((1, 4, 6, 6, 3), torch.float64, seed=9)
    S = torch.full(V.shape[:4], 3.0, dtype=torch.float64)
    out = weighted_pool3d_reference(V, S, (2, 3, 3), mode="window_softmax", temperature=0.1)
    torch.testing.assert_close(out, F.avg_pool3d(V.permute(0, 4, 1, 2, 3), (2, 3, 3)).permute(0, 2, 3, 4, 1))


def test_reference_softmax_weights_one_window_by_hand():
    V, S = _inputs((1, 1, 2, 2, 4), torch.float64, seed=10)
    out = weighted_pool3d_reference(V, S, (1, 2, 2), mode="window_softmax", temperature=0.5)
    w = torch.softmax(S.reshape(4) / 0.5, 0)
    torch.testing.assert_close(out.reshape(4), (w[:, None] * V.reshape(4, 4)).sum(0))


def test_ppllava_output_shape():
    V, S = _inputs((1, 8, 24, 24, 8), torch.float32)
    assert weighted_pool3d_reference(V, S, (2, 3, 3)).shape == (1, 4, 8, 8, 8)
    assert weighted_pool3d_reference(V, S, (2, 3, 3), (1, 2, 2)).shape == (1, 7, 11, 11, 8)


def test_auto_dispatch_on_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("VIDEO2PARAM_KERNELS", raising=False)
    V, S = _inputs((1, 2, 3, 3, 4), torch.float32)
    assert kernel_backend(V, S) == "torch"
    out = weighted_pool3d(V.requires_grad_(True), S, (1, 3, 3))
    assert type(out.grad_fn).__name__ != "WeightedPool3dFunctionBackward"


# ------------------------------------------------------------------ input errors


@pytest.mark.parametrize(
    "V,S,kwargs,match",
    [
        (torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4), {}, "V must be a \\(B, T, H, W, C\\)"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3), {}, "S must be a \\(B, T, H, W\\)"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 4), {}, "must equal V's"),
        (torch.zeros(1, 2, 3, 3, 4, dtype=torch.int32), torch.zeros(1, 2, 3, 3), {}, "V must be float16"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3, dtype=torch.int64), {}, "S must be float16"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3, device="meta"), {}, "S is on meta"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": (3, 1, 1)}, "larger than the input"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": (1, 4, 1)}, "larger than the input"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": (1, 1)}, "kernel must be a 3-tuple"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": 2}, "kernel must be a 3-tuple"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": (1, 0, 1)}, "kernel must be a 3-tuple"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"kernel": (1, 1.5, 1)}, "kernel must be"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"stride": (1, -1, 1)}, "stride must be a 3-tuple"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"mode": "max"}, "mode must be one of"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"temperature": 0.0}, "temperature"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"temperature": float("inf")}, "temperature"),
        (torch.zeros(1, 2, 3, 3, 4), torch.zeros(1, 2, 3, 3), {"temperature": "1"}, "temperature"),
    ],
)
def test_bad_inputs_raise_value_error(V, S, kwargs, match):
    kwargs = {"kernel": (1, 2, 2), **kwargs}
    for fn in (weighted_pool3d, weighted_pool3d_reference):
        with pytest.raises(ValueError, match=match):
            fn(V, S, **kwargs)


# ------------------------------------------------------------------ GPU compilation, without a GPU


# Independent of video2param's own bookkeeping: the places Triton's interpreter patches.
_LANGUAGE_PLACES = ("triton.language", "triton.language.core", "triton.language.standard", "triton.language.math")


def _language_state() -> dict[str, dict[str, object]]:
    tl = importlib.import_module("triton.language")
    places = {name: importlib.import_module(name) for name in _LANGUAGE_PLACES}
    places.update({"tensor": tl.tensor, "dtype": tl.dtype})
    return {name: dict(vars(place)) for name, place in places.items()}


@pytest.mark.parametrize("op", ["pool3d", "lowrank"])
def test_interpreted_launch_leaves_triton_language_as_it_was(interpreter, op):
    """Triton's interpreter leaves triton.language.core patched after nested jit calls (tl.sum ...); a later
    compiled launch in the same process then fails. Every interpreted launch must undo that."""
    before = _language_state()
    if op == "pool3d":
        V, S = _inputs((1, 2, 4, 4, 8), torch.float32, seed=7)
        weighted_pool3d(V.requires_grad_(True), S, (1, 2, 2), mode="window_softmax").sum().backward()
    else:
        x = torch.randn(1, 3, 16)
        A, B = torch.randn(1, 8, 16, requires_grad=True), torch.randn(1, 16, 8, requires_grad=True)
        K.lowrank_delta(x, A, B, 1.0).sum().backward()
    after = _language_state()
    for place, names in before.items():
        changed = sorted(n for n, value in names.items() if after[place].get(n) is not value)
        assert not changed, f"{place}: still patched after the launch: {changed[:10]}"


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """What the interpreter cannot check: the GPU compiler accepts the real launches (H100, sm_90).

    Compiled in a fresh process with an empty Triton cache: nothing the interpreter tests did to
    Triton in this process, and no cubin from an earlier run, can decide the outcome.
    """
    if not K.triton_available():
        pytest.skip("triton is not installed")
    done = run_isolated("pool3d", tmp_path / "triton-cache")
    if done.returncode == NO_TOOLS:  # a Triton build without the bundled CUDA tools
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert set(report) == {"_pool3d_fwd_kernel", "_pool3d_bwd_kernel"}
    for name, seen in report.items():
        assert "STACK:0 " in seen["resources"], f"{name}: register spills: {seen['resources']}"
