"""Video methods: each file is one method; ``base`` holds the protocol, the contexts and the registry."""

from .base import (
    LLMInfo,
    LowRank,
    Conditioning,
    LLMReadout,
    Prompt,
    TokenContext,
    VideoContext,
    VideoMethod,
    WeightContext,
    available_methods,
    get_method,
    register_method,
)

__all__ = [
    "Conditioning", "LLMInfo", "LLMReadout", "LowRank", "Prompt", "TokenContext", "VideoContext", "VideoMethod", "WeightContext",
    "available_methods", "get_method", "register_method",
]
