"""Data for video QA: the synthetic MovingShapes benchmark, a word tokenizer built in code, batching, scoring."""

from .collate import IGNORE_INDEX, PROMPT_WORDS, VideoQACollator, format_prompt, stack_videos
from .evaluate import evaluate
from .moving_shapes import (
    QUESTION_CATEGORY,
    QUESTION_TYPES,
    MovingShapes,
    MovingShapesConfig,
    Scene,
    SceneObject,
    VideoQA,
    chance_accuracy,
    make_splits,
    moving_shapes_vocabulary,
)
from .tokenizer import build_word_tokenizer, moving_shapes_tokenizer
from .video_qa import VideoQADataset, VideoQARecord, question_prompt_ids, read_video_qa

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_WORDS",
    "QUESTION_CATEGORY",
    "QUESTION_TYPES",
    "MovingShapes",
    "MovingShapesConfig",
    "Scene",
    "SceneObject",
    "VideoQA",
    "VideoQACollator",
    "VideoQADataset",
    "VideoQARecord",
    "build_word_tokenizer",
    "chance_accuracy",
    "evaluate",
    "format_prompt",
    "make_splits",
    "moving_shapes_tokenizer",
    "moving_shapes_vocabulary",
    "question_prompt_ids",
    "read_video_qa",
    "stack_videos",
]
