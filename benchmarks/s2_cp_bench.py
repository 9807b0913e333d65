"""S2-Attn with context parallelism on CPU: activation memory, bytes sent and step time
per rank for P = 1, 2, 4 (``longlora_plugin/s2/halo_exchange.py``).

One training step (forward + backward) of a Llama-style model on one row of ``--length``
tokens, S2 group ``--group``, under ``torch.distributed.run`` with gloo. Per rank it
records:

* *activation bytes*: the tensors autograd saves for the backward pass (a
  ``torch.autograd.graph.saved_tensors_hooks`` count of distinct storages, parameters
  excluded): the memory context parallelism divides;
* *sent bytes*: the keys and values each attention call sends (the cost model of the
  module docstring), next to ring attention's volume for the same shapes;
* the step's wall time (with P processes on a 2-core machine this is contention, not
  speed: compare activation and sent bytes, which do not depend on the machine).

Run (writes ``benchmarks/results/s2_cp_cpu.json`` when run for 1, 2 and 4)::

    .venv/bin/python -m benchmarks.s2_cp_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "s2_cp_cpu.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(args: argparse.Namespace) -> None:
    """One rank: build the model, run one step, write ``<out>/rank<r>.json``."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from longlora_plugin import enable_s2_attn
    from longlora_plugin.s2.context_parallel import ContextParallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cp = ContextParallel()
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.length,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    enable_s2_attn(model, group_size=args.group, context_parallel=cp if cp.size > 1 else None)
    model.train()
    ids = torch.randint(0, 1024, (1, args.length), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    local = cp.shard(batch) if cp.size > 1 else batch
    count = (ids[:, 1:] >= 0).sum()

    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # parameters are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**local, num_items_in_batch=count).loss
        loss.backward()

    run()  # warm-up
    model.zero_grad()
    saved.clear()
    cp.sent_bytes.clear()
    dist.barrier()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    chunk = args.length // cp.size
    head_dim = args.hidden // args.heads
    ring = 2 * head_dim * 4 * args.kv_heads * chunk * (cp.size - 1)  # fp32, per layer
    record = {
        "rank": cp.rank,
        "size": cp.size,
        "activation_bytes": sum(saved.values()),
        "sent_bytes_per_layer": cp.sent_bytes[: args.layers] if cp.size > 1 else [0] * args.layers,
        "ring_bytes_per_layer": ring,
        "step_seconds": round(seconds, 3),
    }
    Path(args.out, f"rank{cp.rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def launch(size: int, args: argparse.Namespace, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(size)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += ["-m", "benchmarks.s2_cp_bench", "--rank-main", "--out", str(out)]
    for key in ("length", "group", "hidden", "layers", "heads", "kv_heads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=not args.verbose)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--group", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--result", default=str(RESULT), help="JSON to write; empty: none")
    args = parser.parse_args(argv)
    if args.rank_main:
        rank_main(args)
        return 0
    runs = {}
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            runs[size] = launch(size, args, Path(tmp))
    base = max(r["activation_bytes"] for r in runs[min(runs)])
    lines = [
        f"L={args.length}, G={args.group}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, fp32, one row",
        "",
        "| P | activation MB per rank (max) | vs P=1 | sent KB per layer (max rank) "
        "| ring attention KB per layer | step s (max rank) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size, ranks in runs.items():
        act = max(r["activation_bytes"] for r in ranks)
        sent = max(max(r["sent_bytes_per_layer"]) for r in ranks)
        lines.append(
            f"| {size} | {act / 1e6:.1f} | {act / base:.2f} | {sent / 1e3:.1f} "
            f"| {ranks[0]['ring_bytes_per_layer'] / 1e3:.1f} "
            f"| {max(r['step_seconds'] for r in ranks):.2f} |"
        )
    print("\n".join(lines))
    if args.result:
        payload = {
            "benchmark": "S2-Attn context parallelism on CPU (gloo)",
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
            "python": platform.python_version(),
            "settings": {k: getattr(args, k) for k in ("length", "group", "hidden", "layers")}
            | {"heads": args.heads, "kv_heads": args.kv_heads},
            "runs": {str(k): v for k, v in runs.items()},
            "table": lines,
        }
        Path(args.result).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
