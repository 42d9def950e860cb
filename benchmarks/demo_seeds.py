"""Combine several `video2param demo` runs (different --seed) into one table: per method and question type, the
mean accuracy over the runs and its range.

On the demo's ~1M-parameter LM the slow question types (direction, count, order) are learned abruptly, late in the
budget, and whether a method gets there in 1200 steps depends on the seed: one run cannot tell two methods apart by a
few points. This is the table docs/results.md reports.

    for s in 0 1 2; do video2param demo --method all --seed $s --output-dir runs/all_seed$s; done
    python benchmarks/demo_seeds.py runs/all_seed0 runs/all_seed1 runs/all_seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(run_dirs: list[str]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SystemExit(f"demo_seeds.py: {path} not found (run `video2param demo --output-dir {d}` first)")
        runs.append(json.loads(path.read_text()))
    return runs


def table(runs: list[dict], baseline: str = "llava") -> str:
    """Markdown: chance row, then per method mean (min–max) per type, and the gap of the mean to the baseline."""
    methods = [m for m in runs[0]["rows"] if all(m in r["rows"] for r in runs)]
    keys = [k for k in runs[0]["rows"][methods[0]]["accuracy"] if k != "overall"] + ["overall"]
    seeds = [r["config"]["seed"] for r in runs]
    head = ["method", *keys, "visual tokens", f"worst type vs {baseline} (mean)"]
    lines = [f"Mean accuracy in % over seeds {', '.join(map(str, seeds))} (lowest–highest run in brackets).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chance = runs[0]["chance"]
    lines.append("| chance | " + " | ".join(f"{100 * chance[k]:.1f}" if k in chance else "" for k in keys) + " | | |")
    values = {m: {k: [100 * r["rows"][m]["accuracy"][k] for r in runs] for k in keys} for m in methods}
    means = {m: {k: statistics.fmean(v) for k, v in per_type.items()} for m, per_type in values.items()}
    for m in methods:
        cells = [f"{means[m][k]:.1f} ({min(values[m][k]):.0f}–{max(values[m][k]):.0f})" for k in keys]
        gaps = {k: means[m][k] - means[baseline][k] for k in keys if k not in ("static", "temporal", "overall")}
        worst = min(gaps, key=gaps.get)
        label = f"{m} (baseline)" if m == baseline else m
        gap = "" if m == baseline else f"{worst} {gaps[worst]:+.1f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {runs[0]['rows'][m]['visual_tokens']} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="Output directories of `video2param demo` runs.")
    args = parser.parse_args()
    print(table(load(args.runs)))


if __name__ == "__main__":
    main()
