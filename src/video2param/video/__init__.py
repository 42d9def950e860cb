"""Video input: decode and sample files (:mod:`.io`), encode frames with a vision tower (:mod:`.encoder`),
cache features on disk (:mod:`.cache`); a CLIP/SigLIP dual encoder (:mod:`.dual_encoder`). PyAV is imported only
when a file is decoded."""

from .cache import FeatureCache
from .dual_encoder import DualEncoder
from .encoder import EncodedVideo, FramePreprocessing, VisionEncoder
from .io import (
    DecodeStats,
    SampledFrame,
    VideoClip,
    VideoDecodeError,
    VideoFileNotFoundError,
    VideoPermissionError,
    VideoReader,
    load_video,
    sample_times,
)

__all__ = [
    "DecodeStats",
    "DualEncoder",
    "EncodedVideo",
    "FeatureCache",
    "FramePreprocessing",
    "SampledFrame",
    "VideoClip",
    "VideoDecodeError",
    "VideoFileNotFoundError",
    "VideoPermissionError",
    "VideoReader",
    "VisionEncoder",
    "load_video",
    "sample_times",
]
