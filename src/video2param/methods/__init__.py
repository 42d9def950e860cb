"""Video methods: each file is one method; ``base`` holds the protocol, the contexts and the registry."""

from .base import (
    LLMInfo,
    LowRank,
    TextInputs,
    TokenContext,
    VideoContext,
    VideoMethod,
    WeightContext,
    available_methods,
    get_method,
    register_method,
)

__all__ = [
    "LLMInfo", "LowRank", "TextInputs", "TokenContext", "VideoContext", "VideoMethod", "WeightContext",
    "available_methods", "get_method", "register_method",
]
