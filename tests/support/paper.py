"""The LongLoRA paper's measured costs, which the memory and time estimate is checked against."""

from __future__ import annotations

# The paper (Table 6 / section 4.2 text): Llama-2 7B, 1000 steps on 8 x A100 80GB,
# FlashAttention-2, DeepSpeed ZeRO-2, batch 1 x accumulation 8 per GPU.
# (method, sequence_len) -> (hours, GB); None = out of memory.
PAPER_7B_COST: dict[tuple[str, int], tuple[float, float] | None] = {
    ("full", 8192): (7.4, 46.3),
    ("full", 16384): (16.3, 57.4),
    ("full", 32768): (39.8, 68.8),
    ("full", 65536): None,
    ("lora", 8192): (6.0, 25.7),
    ("lora", 16384): (14.0, 34.7),
    ("lora", 32768): (36.5, 46.5),
    ("lora", 65536): (92.5, 71.1),
    ("longlora", 8192): (5.2, 25.6),
    ("longlora", 16384): (11.3, 34.6),
    ("longlora", 32768): (24.6, 46.4),
    ("longlora", 65536): (52.4, 69.8),
}
# Without FlashAttention-2, 7B at 8k (the paper's text): (hours, GB).
PAPER_7B_NO_FLASH_8K: dict[str, tuple[float, float]] = {
    "lora": (17.5, 55.5),
    "longlora": (8.2, 30.3),
}
