"""``longlora.context_parallel`` in ``axolotl train`` on CPU processes: how far the
adapters trained with rows split over ranks are from the data-parallel run on whole rows.

Trains the tiny Llama of the tests (LoRA r4 on q/k/v/o, embeddings and norms in full,
RoPE linear x4 to 256 tokens, S2 G = 64, 3 AdamW steps at lr 1e-3, packed 256-token rows)
with ``axolotl train`` under ``torch.distributed.run`` (gloo; the CPU shims of
``tests/support/cpu_ranks_plugin.py``), in these pairs:

* 2 ranks, DDP: whole rows vs ``context_parallel: 2``;
* 2 ranks, DeepSpeed ZeRO-2 and ZeRO-3: whole rows vs ``context_parallel: 2``;
* the same two with 2 micro-batches of gradient accumulation;
* 4 ranks, DDP: whole rows vs ``context_parallel: 4`` and vs ``context_parallel: 2``
  (two data-parallel groups); and unpacked rows (one document each, so the ranks of a
  group hold rows of different lengths, padded by the split step) vs ``context_parallel: 4``;

and, as the noise floor, DDP vs ZeRO-3 on whole rows (the same computation, another
summation order). Per pair: the largest difference of the saved adapter tensors (LoRA,
embeddings, norms) and the logged losses. Writes ``benchmarks/results/cp_axolotl_cpu.json``.

    .venv/bin/python -m tests.support.cp_axolotl_equality      # ~10 min on 2 cores

It lives next to the multi-rank launchers of the tests it is built on (``ranks.py``): the
benchmarks never import the tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.support.ranks import ZERO, axolotl, environment, lora_config, write_config
from tests.support.tiny_models import build_tiny_model, write_text_dataset

REPO = Path(__file__).resolve().parents[2]
RESULT = REPO / "benchmarks" / "results" / "cp_axolotl_cpu.json"
# name: (ranks, context_parallel, extra config)
RUNS = {
    "ddp2": (2, 1, {}),
    "ddp2-cp2": (2, 2, {}),
    "zero3-2": (2, 1, {"deepspeed": ZERO[3]}),
    "zero3-2-cp2": (2, 2, {"deepspeed": ZERO[3]}),
    "zero2-2": (2, 1, {"deepspeed": ZERO[2]}),
    "zero2-2-cp2": (2, 2, {"deepspeed": ZERO[2]}),
    "ddp2-ga2": (2, 1, {"gradient_accumulation_steps": 2}),
    "ddp2-ga2-cp2": (2, 2, {"gradient_accumulation_steps": 2}),
    "zero3-2-ga2": (2, 1, {"deepspeed": ZERO[3], "gradient_accumulation_steps": 2}),
    "zero3-2-ga2-cp2": (2, 2, {"deepspeed": ZERO[3], "gradient_accumulation_steps": 2}),
    "ddp4": (4, 1, {}),
    "ddp4-cp4": (4, 4, {}),
    "ddp4-cp2": (4, 2, {}),
    "ddp4-unpacked": (4, 1, {"sample_packing": False}),
    "ddp4-unpacked-cp4": (4, 4, {"sample_packing": False}),
}
PAIRS = [
    ("ddp2", "zero3-2"),  # noise floor: no splitting, another reduction order
    ("ddp2", "ddp2-cp2"),
    ("zero3-2", "zero3-2-cp2"),
    ("zero2-2", "zero2-2-cp2"),
    ("ddp2-ga2", "ddp2-ga2-cp2"),
    ("zero3-2-ga2", "zero3-2-ga2-cp2"),
    ("ddp4", "ddp4-cp4"),
    ("ddp4", "ddp4-cp2"),
    ("ddp4-unpacked", "ddp4-unpacked-cp4"),
]


def _train(work: Path, base: Path, data: Path, name: str) -> dict:
    ranks, size, extra = RUNS[name]
    run_dir = work / name
    run_dir.mkdir()
    block = {"context_parallel": size} if size > 1 else {}
    cfg = write_config(
        run_dir / "cfg.yml", lora_config(base, data, run_dir, longlora=block, **extra)
    )
    env = environment() if "deepspeed" in extra else environment(ACCELERATE_USE_CPU="true")
    start = time.perf_counter()
    log = axolotl("train", cfg, ranks=ranks, env=env).stdout
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "losses": re.findall(r"'loss': '?([0-9.]+)", log),
        "adapter": load_file(str(run_dir / "out" / "adapter_model.safetensors")),
    }


def _kind(key: str) -> str:
    return "lora" if "lora_" in key else "embed" if "embed_tokens" in key else "norm"


def compare(a: dict, b: dict) -> dict:
    diffs: dict[str, float] = {}
    for key, tensor in a["adapter"].items():
        diff = (tensor - b["adapter"][key]).abs().max().item()
        diffs[_kind(key)] = max(diffs.get(_kind(key), 0.0), diff)
    return {
        "max_abs_diff": {k: float(f"{v:.3g}") for k, v in sorted(diffs.items())},
        "losses_equal": a["losses"] == b["losses"],
        "losses": a["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_tiny_model(work / "base", arch="llama")
        data = write_text_dataset(work / "data.jsonl")
        runs = {}
        for name in RUNS:
            runs[name] = _train(work, base, data, name)
            print(f"{name}: {runs[name]['seconds']} s, losses {runs[name]['losses']}", flush=True)
    pairs = {f"{a} vs {b}": compare(runs[a], runs[b]) for a, b in PAIRS}
    for pair, result in pairs.items():
        print(pair, result["max_abs_diff"], "losses equal:", result["losses_equal"])
    payload = {
        "machine": f"{platform.machine()}, {platform.node()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "runs": {
            name: {"seconds": r["seconds"], "losses": r["losses"]} for name, r in runs.items()
        },
        "pairs": pairs,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
