"""CPU quickstart: ``axolotl train`` with the plugin on a tiny model built locally.

``python -m longlora_plugin.quickstart`` (what ``make demo`` runs) builds a tiny
random-weight Llama with a 64-token context and a text dataset under ``./outputs``,
trains ``example_configs/quickstart-cpu.yml`` (LongLoRA to 256 tokens: S2-Attn, LoRA +
embeddings/norms, linear RoPE interpolation x4), merges the adapter with
``axolotl merge-lora`` and checks what a user would check: the two plugin log lines, the
embeddings and norms inside the adapter, and the RoPE scaling in the merged
``config.json``. No network, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from longlora_plugin.tiny_models import OFFLINE_ENV, build_tiny_model, write_text_dataset

CONFIG = Path("example_configs/quickstart-cpu.yml")
OUTPUTS = Path("outputs")
LOG_LINES = (
    r"longlora: S2-Attn on \d+ attention layers, group size \d+, shift \d+",
    r"longlora: RoPE .*",
)


def _run(step: str, args: list[str], env: dict[str, str]) -> str:
    """Run an Axolotl CLI module, streaming its output (and its progress bars)."""
    print(f"\n== {step}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"{step} failed (exit {proc.returncode})")
    print(f"== {step}: {time.perf_counter() - start:.0f} s", flush=True)
    return "".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)

    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base, data = OUTPUTS / "tiny-base", OUTPUTS / "tiny-data.jsonl"
    if not (base / "config.json").is_file():
        print(f"== building a tiny Llama (context 64) in {base}", flush=True)
        build_tiny_model(base, arch="llama")
    if not data.is_file():
        write_text_dataset(data, n_docs=256)

    log = _run("train", ["axolotl.cli.train", str(args.config)], env)
    _run("merge", ["axolotl.cli.merge_lora", str(args.config)], env)

    print("\n== what LongLoRA set up")
    for pattern in LOG_LINES:
        found = re.findall(pattern, log)
        print(f"  {found[0] if found else 'MISSING: ' + pattern}")
    out = OUTPUTS / "quickstart-cpu"
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())  # noqa: SIM118 - safe_open is not a mapping
    full = [k.rsplit(".", 2)[-2] for k in names if ".lora_" not in k]
    saved = [f"{name} x{full.count(name)}" for name in dict.fromkeys(full)]
    print(f"  trained in full inside the adapter: {', '.join(saved)}")
    merged = json.loads((out / "merged" / "config.json").read_text())
    print(f"  merged config.json rope_parameters: {merged.get('rope_parameters')}")
    print(f"  merged max_position_embeddings: {merged.get('max_position_embeddings')}")


if __name__ == "__main__":
    main()
