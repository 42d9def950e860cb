"""How a video context reaches the LLM: as spliced input tokens or as per-sample low-rank weight deltas."""
