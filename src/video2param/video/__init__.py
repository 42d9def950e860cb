"""Video input: decode and sample files (:mod:`.io`), encode frames with a vision tower (:mod:`.encoder`),
cache features on disk (:mod:`.cache`). PyAV is imported only when a file is decoded."""

from .cache import FeatureCache
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
