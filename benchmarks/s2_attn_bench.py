"""S2-Attn cost against full attention and against ideal grouped attention, same run.

For each row length L, a 2-layer Llama (hidden 256, 4 heads) does forward+backward on one
row of L tokens under: full causal attention (the wrapped backend), S2-Attn (G = L/4),
and "ideal grouped" (the same tokens as 4 independent rows of L/4 under full attention:
the floor any grouped attention can reach). Times are the minimum of interleaved repeats;
peak memory is the rise of the peak RSS above the live RSS during one step, in a
fresh subprocess whose allocations return to the OS when freed (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA). Eval overhead is
the eval-mode forward of the S2-enabled model over the plain one (should be ~1.0).

    .venv/bin/python -m benchmarks.s2_attn_bench                      # CPU, sdpa + eager
    .venv/bin/python -m benchmarks.s2_attn_bench --device cuda --dtype bfloat16 \
        --backends sdpa flash_attention_2 --lengths 8192 16384 32768
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from longlora_plugin import enable_s2_attn

VARIANTS = ("full", "s2", "grouped")


def build(
    backend: str, length: int, device: str, dtype: torch.dtype, variant: str
) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=length,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.set_attn_implementation(backend)
    if variant == "s2":
        enable_s2_attn(model, group_size=length // 4)
    return model


def batch(variant: str, length: int, device: str) -> torch.Tensor:
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    return ids.view(4, length // 4) if variant == "grouped" else ids


def train_step(model, ids) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure_times(backend, length, device, dtype, repeats) -> dict[str, float]:
    models = {v: build(backend, length, device, dtype, v) for v in VARIANTS}
    inputs = {v: batch(v, length, device) for v in VARIANTS}
    best = {v: float("inf") for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        train_step(models[v], inputs[v])
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for v in VARIANTS:
            best[v] = min(best[v], timed(lambda v=v: train_step(models[v], inputs[v]), device))
    # eval: the same weights with and without S2; alternate which goes first
    evals = {"eval_full": models["full"].eval(), "eval_s2": models["s2"].eval()}
    best.update({name: float("inf") for name in evals})
    with torch.no_grad():
        for i in range(3 * repeats + 1):
            for name in sorted(evals, reverse=bool(i % 2)):
                run = lambda m=evals[name]: m(input_ids=inputs["full"])  # noqa: E731
                elapsed = timed(run, device)
                if i:  # the first round warms up
                    best[name] = min(best[name], elapsed)
    return best


def peak_memory(backend, length, device, dtype) -> dict[str, float]:
    """Bytes by which each variant's training step raises the peak above what was live before."""
    if device == "cuda":
        result = {}
        for variant in VARIANTS:
            model = build(backend, length, device, dtype, variant)
            ids = batch(variant, length, device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train_step(model, ids)
            torch.cuda.synchronize()
            result[variant] = float(torch.cuda.max_memory_allocated() - before)
            del model
        return result
    # A fresh process whose large allocations are mmap-backed, so RSS follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [
        sys.executable,
        "-m",
        "benchmarks.s2_attn_bench",
        "--memory-child",
        "--backends",
        backend,
        "--lengths",
        str(length),
    ]
    child = subprocess.run(
        command, capture_output=True, text=True, check=True, env=env, cwd=Path(__file__).parents[1]
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(backend: str, length: int) -> None:
    result = {}
    for variant in VARIANTS:
        model = build(backend, length, "cpu", torch.float32, variant)
        ids = batch(variant, length, "cpu")
        train_step(model, ids)  # lazily allocated state (grads) exists before measuring
        gc.collect()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS high-water mark to the current RSS
        train_step(model, ids)
        result[variant] = float((_status_kib("VmHWM") - before) * 1024)
        del model
        gc.collect()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-eager-length", type=int, default=8192, help="eager full attention is O(L^2) memory"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.backends[0], args.lengths[0])
        return

    dtype = getattr(torch, args.dtype)
    print(
        f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, {args.dtype}"
    )
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print()
    print(
        "| backend | L | full s | S2 s | grouped s | S2/full | S2/grouped | eval S2/plain | mem S2/full | mem grouped/full |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    jobs = [
        (b, n)
        for b in args.backends
        for n in args.lengths
        if not (b == "eager" and n > args.max_eager_length)
    ]
    for backend, length in tqdm(jobs, desc="benchmark", file=sys.stderr):
        t = measure_times(backend, length, args.device, dtype, args.repeats)
        mem = peak_memory(backend, length, args.device, dtype)
        row = {
            "backend": backend,
            "length": length,
            **{f"time_{k}": v for k, v in t.items()},
            **{f"mem_{k}": v for k, v in mem.items()},
        }
        rows.append(row)
        print(
            f"| {backend} | {length} | {t['full']:.3f} | {t['s2']:.3f} | {t['grouped']:.3f} | "
            f"{t['s2'] / t['full']:.2f} | {t['s2'] / t['grouped']:.2f} | {t['eval_s2'] / t['eval_full']:.3f} | "
            f"{mem['s2'] / mem['full']:.2f} | {mem['grouped'] / mem['full']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
