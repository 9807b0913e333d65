"""The environment that Axolotl and the Hugging Face libraries need on a machine without
the Hub (tests, the demo and the benchmarks set it for every run they start)."""

from __future__ import annotations

# AXOLOTL_DO_NOT_TRACK=1 is mandatory: without it an `axolotl train` with no network
# hangs forever in the telemetry flush after training.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
}
