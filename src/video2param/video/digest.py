"""Digests of tensors: the checksum of cache entries and the weights part of an encoder's identity.

A module of its own so that the feature cache and the vision encoder both use it without importing each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

__all__ = ["tensor_digest", "weights_signature"]

# Values read per tensor by `weights_signature`: enough to see an in-place update that bypasses the version
# counter (``param.data.copy_(...)``), few enough to cost next to nothing per call.
_SIGNATURE_SAMPLES = 16


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """blake2b over names, dtypes, shapes and raw bytes of named tensors (order as given)."""
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in tensors:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).contiguous()
        if flat.numel():
            digest.update(flat.cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_signature(state: Mapping[str, torch.Tensor]) -> str:
    """A cheap token that changes whenever the tensors of `state` are changed, moved or replaced.

    Combines each tensor's storage address, version counter (bumped by every in-place operation autograd sees,
    ``load_state_dict`` included), dtype, shape and device with a few of its values (which catch writes through
    ``.data``, invisible to the version counter). Not a content hash: equal signatures mean "nothing was
    touched since", so the full digest need not be recomputed.
    """
    parts: list[str] = []
    samples: list[torch.Tensor] = []
    for name, tensor in state.items():
        parts.append(f"{name}|{tensor.data_ptr()}|{tensor._version}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.device}")
        flat = tensor.detach().reshape(-1)
        if flat.numel() and not flat.is_meta:
            step = max(1, flat.numel() // _SIGNATURE_SAMPLES)
            samples.append(flat[::step][:_SIGNATURE_SAMPLES].float())
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=16)
    if samples:
        # One transfer to the host for all tensors (they normally share a device).
        values = torch.cat([s.to(samples[0].device) for s in samples]).cpu()
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()
