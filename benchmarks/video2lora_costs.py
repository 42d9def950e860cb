"""Cost of Video2LoRA against its teacher (llava, the video in context) on the same LM, same run.

For each frame count: time to first token of a question with the video already encoded (teacher: its visual
tokens precomputed; student: the LoRA already generated, batched low-rank path and merged into the weights), the
cost of generating the LoRA itself (teacher read-out + hypernetwork, all segments), visual tokens, and the rank of
the composed LoRA. ``--memory-frames`` measures the peak resident memory of generating one LoRA in a fresh
process (the read-out runs one segment at a time, so it should not grow with the video's length).

    python benchmarks/video2lora_costs.py                          # llama-512x8, 8/32/128 frames
    python benchmarks/video2lora_costs.py --memory-frames 128 1024 # peak memory of LoRA generation
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from video2param import VideoAdapterConfig, wrap_model
from video2param.bench import time_to_first_token
from video2param.data.tokenizer import build_word_tokenizer

LMS = {"llama-128x4": (128, 4, 4, 256), "llama-512x8": (512, 8, 8, 1376)}  # as benchmarks/method_costs.py


def build_lm(name: str, max_positions: int):
    hidden, layers, heads, ffn = LMS[name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def build_tokenizer():
    """A word tokenizer that knows the read-out instruction ("Internalize this video for later captioning.")."""
    tok = build_word_tokenizer(["internalize", "this", "video", "for", "later", "captioning", "."])
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


def build(lm: str, frames: int, segment: int, max_positions: int, rank: int, hypernet: dict):
    """Teacher (llava, reads up to ``frames`` in context) and student (one LoRA per ``segment`` frames) on one LM."""
    llm = build_lm(lm, max_positions)
    tok = build_tokenizer()
    teacher = wrap_model(llm, VideoAdapterConfig(method="llava", vision_hidden_size=64, num_frames=frames),
                         tokenizer=tok, stage="frozen")
    cfg = VideoAdapterConfig(method="video2lora", vision_hidden_size=64, num_frames=frames, rank=rank,
                             inject_every=1, targets=("mlp",), options={**hypernet, "segment_frames": segment})
    student = wrap_model(llm, cfg, tokenizer=tok, teacher=teacher, stage="frozen")
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for name, p in student.method.named_parameters():
            if name.startswith(("scale_B", "bias_B")):
                p.normal_(0, 0.02)
    return teacher, student


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def costs(args) -> list[dict]:
    rows = []
    hypernet = json.loads(args.hypernet)
    for frames in args.frames:
        teacher, student = build(args.lm, frames, args.segment, max(4096, frames * args.patches + 256), args.rank,
                                 hypernet)
        ids = torch.randint(20, 500, (1, args.prompt_tokens))
        ids[0, 0] = student.video_token_id  # the <video> mark
        mask = torch.ones_like(ids)
        feats = torch.randn(1, frames, args.patches, 64)
        with torch.no_grad():
            tokens = teacher.encode_video(feats)
            lora = student.encode_video(feats)
            generation = timed(lambda: student.encode_video(feats), max(args.repeats // 3, 1))
        # Interleave the three measurements so machine load affects them alike.
        t_teacher, t_student, t_merged = [], [], []
        for _ in range(args.rounds):
            t_teacher.append(time_to_first_token(teacher, ids, mask, tokens, repeats=args.repeats))
            t_student.append(time_to_first_token(student, ids, mask, lora, repeats=args.repeats))
            with student.merged(lora):
                t_merged.append(time_to_first_token(student, ids, mask, lora, repeats=args.repeats))
        teacher_s, student_s, merged_s = (statistics.median(t) for t in (t_teacher, t_student, t_merged))
        rank = next(iter(lora.deltas.values())).A.shape[1]
        rows.append({"frames": frames, "visual_tokens": tokens.num_tokens, "teacher_ttft_ms": 1e3 * teacher_s,
                     "student_ttft_ms": 1e3 * student_s, "merged_ttft_ms": 1e3 * merged_s,
                     "speedup": teacher_s / student_s, "speedup_merged": teacher_s / merged_s,
                     "lora_generation_ms": 1e3 * generation, "composed_rank": rank,
                     "hypernet_params": sum(p.numel() for p in student.method.parameters())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def peak_memory(args) -> None:
    """Child process: peak RSS growth while generating one LoRA of ``args.child`` frames."""
    hypernet = json.loads(args.hypernet)
    frames = args.child
    teacher, student = build(args.lm, frames, args.segment, 4096, args.rank, hypernet)
    feats = torch.randn(1, frames, args.patches, 64)
    with torch.no_grad():
        student.encode_video(feats[:, : args.segment])  # warm-up: allocator caches, lazy inits
    before = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    with torch.no_grad():
        start = time.perf_counter()
        student.encode_video(feats)
        seconds = time.perf_counter() - start
    print(json.dumps({"frames": frames, "peak_growth_mib": (_hwm_kib() - before) / 1024, "seconds": seconds}))


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _hwm_kib() -> int:
    return _status_kib("VmHWM")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="llama-512x8", choices=list(LMS))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--segment", type=int, default=8, help="Training length = frames per segment LoRA.")
    parser.add_argument("--patches", type=int, default=16, help="Visual tokens per frame.")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hypernet", default="{}", help="Video2LoRA options as JSON (default: the public code's).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the three TTFT measurements.")
    parser.add_argument("--memory-frames", type=int, nargs="*", default=[])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.child is not None:
        peak_memory(args)
        return
    if args.memory_frames:
        for frames in args.memory_frames:
            cmd = [sys.executable, __file__, "--child", str(frames), "--lm", args.lm, "--segment", str(args.segment),
                   "--patches", str(args.patches), "--rank", str(args.rank), "--hypernet", args.hypernet]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
        return
    rows = costs(args)
    print(f"\n{args.lm}, {args.patches} visual tokens per frame, prompt {args.prompt_tokens} tokens, segments of "
          f"{args.segment} frames, rank {args.rank} per segment + bias, targets mlp of every layer; "
          f"{torch.get_num_threads()} threads\n")
    print("| frames | teacher visual tokens | teacher TTFT ms | student TTFT ms (batched LoRA) | × faster | "
          "student TTFT ms (merged) | × faster | LoRA generation ms | composed rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['visual_tokens']} | {r['teacher_ttft_ms']:.1f} | {r['student_ttft_ms']:.1f} | "
              f"{r['speedup']:.1f} | {r['merged_ttft_ms']:.1f} | {r['speedup_merged']:.1f} | "
              f"{r['lora_generation_ms']:.0f} | {r['composed_rank']} |")


if __name__ == "__main__":
    main()
