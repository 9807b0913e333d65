"""Recipe variants of the demo's LongLoRA stage, each trained and evaluated the same way.

Run after one ``make demo`` (it needs the cached base model at ``outputs/demo/base`` and
``outputs/demo/train.jsonl`` / ``heldout.txt``). For every variant: the demo's
``example_configs/quickstart-cpu.yml`` with a few keys changed, ``axolotl train`` into
``outputs/ablations/<name>``, then ``longlora eval ppl`` (window-mean, 128/256/512, 100
windows) on the held-out novel. Prints a table and writes
``benchmarks/results/demo_ablations.json``. ~3-4 min per variant on one CPU core.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.demo_ablations [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from longlora_plugin.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "example_configs" / "quickstart-cpu.yml"
OUT = Path("outputs/ablations")
RESULTS = REPO / "benchmarks" / "results" / "demo_ablations.json"
LENGTHS = (128, 256, 512)

QK = {"name": "qk", "modules": ["q_proj", "k_proj"]}
LINEAR = {"rope": {"type": "linear", "factor": "auto"}}  # the paper's interpolation


def linear(steps: int = 200, **changes: Any) -> dict[str, Any]:
    """Changes for a linear-interpolation variant of ``steps`` steps."""
    longlora = {**LINEAR, **changes.pop("longlora", {})}
    return {"longlora": longlora, "max_steps": steps, **changes}


def qk(lr: float) -> list[dict[str, Any]]:
    """An lr group: the LoRA weights of q_proj/k_proj at ``lr``, the rest at the base rate."""
    return [QK | {"lr": lr}]


# name -> (description, changes to the shipped config; a "longlora" dict is merged into the
# block). The shipped config: YaRN x4, S2-Attn G=128, every weight at 2e-3, 400 steps.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "shipped": ("the shipped config (YaRN, 400 steps)", {}),
    "yarn": ("YaRN, 200 steps", {"max_steps": 200}),
    "yarn-no-s2": (
        "YaRN, 200 steps, full attention in training (no S2-Attn)",
        {"max_steps": 200, "longlora": {"s2_attn": False}},
    ),
    "linear": ("linear, 200 steps", linear()),
    "linear-no-s2": (
        "linear, 200 steps, full attention in training (no S2-Attn)",
        linear(longlora={"s2_attn": False}),
    ),
    "linear-qk-2e-4": ("linear, q/k LoRA at 2e-4, 200 steps", linear(lr_groups=qk(2e-4))),
    "linear-qk-2e-4-cosine": (
        "linear, q/k LoRA at 2e-4, cosine decay, 200 steps",
        linear(lr_groups=qk(2e-4), lr_scheduler="cosine"),
    ),
    "linear-qk-5e-4": ("linear, q/k LoRA at 5e-4, 200 steps", linear(lr_groups=qk(5e-4))),
    "linear-qk-5e-4-600": ("linear, q/k LoRA at 5e-4, 600 steps", linear(600, lr_groups=qk(5e-4))),
    "linear-qk-5e-4-cosine": (
        "linear, q/k LoRA at 5e-4, cosine decay, 200 steps",
        linear(lr_groups=qk(5e-4), lr_scheduler="cosine"),
    ),
    "linear-qk-1e-3-cosine": (
        "linear, q/k LoRA at 1e-3, cosine decay, 200 steps",
        linear(lr_groups=qk(1e-3), lr_scheduler="cosine"),
    ),
    "linear-group-half-qk-5e-4": (
        "linear, q/k LoRA at 5e-4, group_size_ratio 0.5, 200 steps",
        linear(lr_groups=qk(5e-4), longlora={"group_size_ratio": 0.5}),
    ),
    "linear-group-half-qk-1e-3": (
        "linear, q/k LoRA at 1e-3, group_size_ratio 0.5, 200 steps",
        linear(lr_groups=qk(1e-3), longlora={"group_size_ratio": 0.5}),
    ),
}


def variant_config(name: str, changes: dict[str, Any]) -> Path:
    """Write the demo config with ``changes`` applied to ``outputs/ablations/<name>.yml``."""
    cfg = yaml.safe_load(CONFIG.read_text())
    for key, value in changes.items():
        if key == "longlora":
            cfg["longlora"] = {**cfg["longlora"], **value}
        else:
            cfg[key] = value
    cfg["output_dir"] = str(OUT / name)
    cfg["dataset_prepared_path"] = str(OUT / "prepared")
    path = OUT / f"{name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_variant(name: str, changes: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    config = variant_config(name, changes)
    start = time.perf_counter()
    log = OUT / f"{name}.log"
    with log.open("w") as fh:
        for args in (
            ["-m", "axolotl.cli.train", str(config)],
            [
                "-m",
                "longlora_plugin",
                "eval",
                "ppl",
                "--model",
                f"{name}={OUT / name}",
                "--data",
                "outputs/demo/heldout.txt",
                "--lengths",
                ",".join(map(str, LENGTHS)),
                "--convention",
                "window-mean",
                "--max-windows",
                "100",
                "--batch-size",
                "8",
                "--out",
                str(OUT / name / "eval"),
            ],
        ):
            subprocess.run([sys.executable, *args], env=env, stdout=fh, stderr=fh, check=True)
    payload = json.loads((OUT / name / "eval" / "ppl.json").read_text())
    ppl = {str(r["length"]): r["ppl"] for r in payload["results"]}  # JSON keys are strings
    return {"ppl": ppl, "seconds": round(time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these only")
    args = parser.parse_args()
    if not Path("outputs/demo/base/config.json").is_file():
        raise SystemExit("run `make demo` first: outputs/demo/base is missing")
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in args.only or list(VARIANTS):
        description, changes = VARIANTS[name]
        print(f"== {name}: {description}", flush=True)
        row = {"description": description, "changes": changes}
        row.update(run_variant(name, changes, env))
        # re-read before writing: two runs with different --only may share the file
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        results[name] = row
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("| variant | " + " | ".join(map(str, LENGTHS)) + " | time |")
    print("|---|" + "---:|" * (len(LENGTHS) + 1))
    for name, row in results.items():
        cells = " | ".join(f"{row['ppl'][str(n)]:.2f}" for n in LENGTHS)
        print(f"| {name}: {row['description']} | {cells} | {row['seconds']} s |")


if __name__ == "__main__":
    main()
