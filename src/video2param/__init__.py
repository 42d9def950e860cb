"""video2param: make any HuggingFace causal LM understand video.

Public API: ``VideoAdapterConfig``, ``wrap_model``, ``VideoModel``, ``register_method`` and the method/context
types; ``load_video`` and ``VisionEncoder`` for video files; ``DualEncoder`` (CLIP/SigLIP) and ``VideoFeatures``
(precomputed features with their vision views).
"""

__version__ = "0.1.0.dev0"

from .config import VideoAdapterConfig
from .methods.base import (
    LowRank,
    TokenContext,
    VideoContext,
    VideoMethod,
    WeightContext,
    available_methods,
    register_method,
)
from .model import VideoModel, wrap_model
from .hub import AdapterNotFoundError
from .serialization import AdapterMismatchError

__all__ = [
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "LowRank",
    "TokenContext",
    "VideoAdapterConfig",
    "VideoContext",
    "VideoMethod",
    "VideoModel",
    "WeightContext",
    "__version__",
    "available_methods",
    "load_video",
    "register_method",
    "wrap_model",
    "VisionEncoder",
    "VideoDecodeError",
    "DualEncoder",
    "VideoFeatures",
]


def __getattr__(name: str):
    # Video I/O pulls in PyAV lazily: the core works without the `video` extra.
    if name in ("load_video", "VideoClip", "VideoDecodeError"):
        from .video import io

        return getattr(io, name)
    if name == "VisionEncoder":
        from .video.encoder import VisionEncoder

        return VisionEncoder
    if name == "DualEncoder":
        from .video.dual_encoder import DualEncoder

        return DualEncoder
    if name == "VideoFeatures":
        from .videos import VideoFeatures

        return VideoFeatures
    raise AttributeError(f"module 'video2param' has no attribute {name!r}")
