"""Video methods: each file is one method; ``base`` holds the protocol, the contexts and the registry.

Importing this package registers the built-in methods (each module registers itself on import).
"""

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

# The built-in methods, registered on import (after base, which they build on).
from . import linvt, llava, ppllava, video2lora, vipe  # noqa: E402,F401
