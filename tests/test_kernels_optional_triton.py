"""Triton is optional (``video2param[cuda]``): without it the references run and a forced Triton path says what
to install; with it, ``import video2param`` and CPU work still never import it.

Each check runs in a fresh interpreter, so what this process already imported cannot hide an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Makes `import triton` raise ImportError, as on a machine where it is not installed.
BLOCK_TRITON = "import sys; sys.modules['triton'] = None\n"

CPU_WORK = """
import json, sys
from types import SimpleNamespace
import torch
import video2param
from video2param import kernels as K

seen = {"triton_imported_by_import": "triton" in sys.modules}
g = torch.Generator().manual_seed(0)
x, A, B = torch.randn(2, 3, 8, generator=g), torch.randn(2, 4, 8, generator=g), torch.randn(2, 6, 4, generator=g)
V, S = torch.randn(1, 2, 4, 4, 5, generator=g), torch.randn(1, 2, 4, 4, generator=g)
seen["lowrank_matches_reference"] = torch.equal(K.lowrank_delta(x, A, B, 0.5), K.lowrank_delta_reference(x, A, B, 0.5))
seen["pool_matches_reference"] = torch.equal(
    K.weighted_pool3d(V, S, (1, 2, 2)), K.weighted_pool3d_reference(V, S, (1, 2, 2))
)
seen["triton_imported_by_cpu_work"] = "triton" in sys.modules
"""


def _run(code: str, **env: str) -> dict:
    """Run ``code`` (which fills a dict ``seen``) in a fresh interpreter; return ``seen``."""
    clean = {k: v for k, v in os.environ.items() if k not in ("VIDEO2PARAM_KERNELS", "TRITON_INTERPRET")}
    script = code + "\nprint(json.dumps(seen))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_and_cpu_work_do_not_import_triton():
    seen = _run(CPU_WORK)
    assert seen == {
        "triton_imported_by_import": False,
        "lowrank_matches_reference": True,
        "pool_matches_reference": True,
        "triton_imported_by_cpu_work": False,
    }


def test_without_triton_references_run_and_forced_triton_names_the_extra():
    forced = textwrap.dedent(
        """
        seen["available"] = K.triton_available()
        cuda = SimpleNamespace(is_cuda=True, dtype=torch.float16)  # dispatch only reads .is_cuda and .dtype
        seen["auto_on_cuda"] = K.kernel_backend(cuda, cuda)
        import os
        os.environ["VIDEO2PARAM_KERNELS"] = "triton"
        seen["forced"] = {}
        for name, call in (("lowrank", lambda: K.lowrank_delta(x, A, B, 0.5)),
                           ("pool", lambda: K.weighted_pool3d(V, S, (1, 2, 2))),
                           ("backend", lambda: K.kernel_backend(cuda))):
            try:
                call()
                seen["forced"][name] = "no error"
            except K.KernelBackendError as err:
                seen["forced"][name] = str(err)
        """
    )
    seen = _run(BLOCK_TRITON + CPU_WORK + forced)
    assert seen["available"] is False
    assert seen["lowrank_matches_reference"] and seen["pool_matches_reference"]
    assert seen["auto_on_cuda"] == "torch"  # CUDA tensors without Triton: the reference, silently
    for name, message in seen["forced"].items():
        assert "Triton is not installed" in message and "video2param[cuda]" in message, (name, message)
