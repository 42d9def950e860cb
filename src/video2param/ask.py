"""Answer one question about one video file with a saved adapter (`video2param ask`)."""

from __future__ import annotations

from pathlib import Path

import torch


def ask(video: str | Path, question: str, *, adapter: str, llm: str, vision: str, tokenizer: str | None = None,
        frames: int | None = None, max_new_tokens: int = 32, revision: str | None = None) -> str:
    """Load the base LM, the vision tower and the adapter, sample the video, and greedy-decode an answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.collate import format_prompt
    from .model import VideoModel
    from .video.encoder import VisionEncoder
    from .video.io import load_video

    tok = AutoTokenizer.from_pretrained(tokenizer or llm)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(llm)
    encoder = VisionEncoder.from_pretrained(vision)
    vm = VideoModel.from_pretrained(model, adapter, vision=encoder, tokenizer=tok, revision=revision)
    vm.eval()
    clip = load_video(video, num_frames=frames or vm.config.num_frames)
    prompt = tok([format_prompt(question, vm.video_token)], return_tensors="pt")
    with torch.inference_mode():
        out = vm.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], videos=[clip],
                          max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
