"""Peak memory and speed of decoding + encoding long videos (64, 256, 1024 frames at 224 px).

Writes a synthetic 224x224 H.264 video with PyAV (or uses ``--video``), then, for each frame count and
mode, runs a fresh worker process that builds a vision tower, resets the peak-RSS counter, and measures:

* ``stream``: ``VisionEncoder.encode_video(path, num_frames=N)``: frames decoded and encoded chunk by
  chunk; memory should grow only by the ``(N, P, Dv)`` features.
* ``two-step``: ``load_video(path, N)`` then ``encode_frames``: also holds the ``N`` uint8 frames.

Run from the repository root::

    PYTHONPATH=src python benchmarks/video_memory.py                # tiny CLIP-like tower, random weights
    PYTHONPATH=src python benchmarks/video_memory.py --tower /path/to/clip-vit-base-patch32   # a local one

Peak RSS is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (Linux); elsewhere it
falls back to ``resource.getrusage`` (peak over the whole worker, setup included). No psutil needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024


def write_video(path: Path, frames: int, size: int, fps: int = 30, gop: int = 60) -> None:
    """Moving gradient + square, H.264, a keyframe every ``gop`` frames (2 s: a common encoder setting)."""
    import av
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", "g": str(gop), "keyint_min": str(gop)}
        for i in range(frames):
            image = np.empty((size, size, 3), np.uint8)
            image[..., 0] = (x + 3 * i) % 256
            image[..., 1] = (y + 2 * i) % 256
            image[..., 2] = (x + y + i) % 256
            left = (5 * i) % (size - 40)
            image[80:120, left : left + 40] = (255, 255, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_encoder(tower: str | None, chunk_size: int):
    import torch

    from video2param.video.encoder import VisionEncoder

    if tower:
        return VisionEncoder.from_pretrained(tower, chunk_size=chunk_size, progress=False)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=224, patch_size=32, hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3
    )
    return VisionEncoder(CLIPVisionModel(config), chunk_size=chunk_size, progress=False)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mib(reset_worked: bool) -> float:
    if reset_worked:
        return _status_kib("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> dict:
    import torch

    from video2param.video.io import load_video

    torch.set_num_threads(args.threads)
    encoder = build_encoder(args.tower, args.chunk_size)
    encoder.encode_video(args.video, num_frames=2)  # warm up decoder, allocator and thread pools
    setup_mib = (_status_kib("VmRSS") or 0) / 1024
    reset_worked = reset_peak()
    start = time.perf_counter()
    if args.mode == "stream":
        features = encoder.encode_video(args.video, num_frames=args.frames).features
        load_s = None
    else:
        clip = load_video(args.video, num_frames=args.frames)
        load_s = time.perf_counter() - start
        features = encoder.encode_frames(clip.frames)
    total_s = time.perf_counter() - start
    peak = peak_rss_mib(reset_worked)
    return {
        "mode": args.mode,
        "frames": args.frames,
        "total_s": total_s,
        "load_s": load_s,
        "frames_per_s": args.frames / total_s,
        "setup_rss_mib": setup_mib,
        "peak_rss_mib": peak,
        "growth_mib": peak - setup_mib,
        "features_mib": features.numel() * features.element_size() / MIB,
        "frames_mib": args.frames * 224 * 224 * 3 / MIB,
        "peak_method": "VmHWM (reset)" if reset_worked else "ru_maxrss",
        "tower": args.tower or "tiny CLIP-like (224 px, patch 32, 3 layers x 192, random weights)",
        "features_shape": list(features.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--modes", nargs="+", default=["stream", "two-step"], choices=["stream", "two-step"])
    parser.add_argument("--video", type=Path, help="video to use (default: write a 1024-frame 224x224 H.264)")
    parser.add_argument("--video-frames", type=int, default=1024, help="length of the generated video")
    parser.add_argument("--tower", help="local HF vision checkpoint (default: tiny random CLIP-like tower)")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.frames = args.frames[0]
        print(json.dumps(worker(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        video = args.video
        if video is None:
            video = Path(tmp) / "long_224.mp4"
            started = time.perf_counter()
            write_video(video, args.video_frames, 224)
            print(f"wrote {video.name}: {args.video_frames} frames 224x224 H.264 in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        rows = []
        for mode in args.modes:
            for frames in args.frames:
                command = [sys.executable, __file__, "--worker", "--video", str(video), "--frames", str(frames),
                           "--mode", mode, "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
                if args.tower:
                    command += ["--tower", args.tower]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    sys.stderr.write(result.stderr)
                    raise SystemExit(f"worker failed for mode={mode} frames={frames}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{mode:9s} {frames:5d} frames: {row['total_s']:.2f} s, peak +{row['growth_mib']:.0f} MiB",
                      file=sys.stderr)

    print(f"tower: {rows[0]['tower']}; chunk_size {args.chunk_size}; {args.threads} threads; "
          f"peak by {rows[0]['peak_method']}\n")
    print("| mode | frames | time (s) | frames/s | RSS after setup (MiB) | peak RSS (MiB) | growth (MiB) "
          "| features (MiB) | growth - features (MiB) | uint8 frames (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['frames']} | {r['total_s']:.1f} | {r['frames_per_s']:.0f} | {r['setup_rss_mib']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r['growth_mib']:.0f} | {r['features_mib']:.1f} "
              f"| {r['growth_mib'] - r['features_mib']:.0f} | {r['frames_mib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
