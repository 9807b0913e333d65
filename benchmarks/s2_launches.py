"""Operations S2-Attn adds per decoder layer to one training step (torch profiler).

A training step (forward + backward with the LM loss) of a Llama with ``n`` and ``2n``
decoder layers is profiled; the difference divided by ``n`` is the cost of one layer, so
embedding, loss and optimizer-free overheads cancel. Counted per layer: on the CPU, kernel
calls, i.e. the lowest ``aten::`` operations that do work (views, allocations and other
metadata-only operations are not counted); on CUDA, device kernels.
Rows: full attention (the wrapped backend), S2-Attn, and the attention-only difference
S2 minus full.

    .venv/bin/python -m benchmarks.s2_launches                        # CPU
    python -m benchmarks.s2_launches --device cuda --dtype bfloat16   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from longlora_plugin import enable_s2_attn

LAYOUTS = ("plain", "packed")
# aten operations that only make views or allocate: not kernel calls
METADATA_OPS = frozenset(
    "aten::" + name
    for name in [
        "as_strided",
        "view",
        "_reshape_alias",
        "alias",
        "_unsafe_view",
        "reshape",
        "empty",
        "empty_strided",
        "empty_like",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "result_type",
        "detach",
        "t",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "narrow",
        "split",
        "unbind",
        "chunk",
        "view_as",
        "contiguous",
        "to",
    ]
)


def build(
    layers: int, heads: int, kv_heads: int, backend: str, device: str, dtype
) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=heads * 16,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.set_attn_implementation(backend)
    return model.train()


def inputs(layout: str, length: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    if layout == "packed":  # three documents, as sample packing lays them out
        a, b = length // 2, length // 3
        pos = torch.cat([torch.arange(a), torch.arange(b), torch.arange(length - a - b)])
        batch["position_ids"] = pos[None].to(device)
    return batch


def count_step(model, batch, device: str) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    model(**batch).loss.backward()  # warm-up (lazy init, caches)
    model.zero_grad(set_to_none=True)
    with profile(activities=activities) as prof:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if _is_kernel(e))


def _does_work(event) -> bool:
    return _is_kernel(event) or any(_does_work(c) for c in event.cpu_children)


def _is_kernel(event) -> bool:
    """The lowest operation in its call tree that does work (not a view or allocation)."""
    if not event.name.startswith("aten::") or event.name in METADATA_OPS:
        return False
    return not any(_does_work(c) for c in event.cpu_children)


def per_layer(args, layout: str, s2: bool) -> float:
    counts = []
    for layers in (args.layers, 2 * args.layers):
        model = build(layers, args.heads, args.kv_heads, args.backend, args.device, args.dtype)
        if s2:
            enable_s2_attn(model, group_size=args.length // 4)
        counts.append(count_step(model, inputs(layout, args.length, args.device), args.device))
    return (counts[1] - counts[0]) / args.layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    unit = "CUDA kernels" if args.device == "cuda" else "CPU kernel calls"
    rows = []
    print(
        f"{unit} per decoder layer per training step, L={args.length}, G={args.length // 4}, "
        f"{args.heads}/{args.kv_heads} heads, {args.backend}, {args.device}, {platform.node()}, "
        f"torch {torch.__version__}, {date.today()}"
    )
    print("| rows | full | S2 | S2 - full |\n|---|---:|---:|---:|")
    for layout in LAYOUTS:
        full, s2 = per_layer(args, layout, False), per_layer(args, layout, True)
        rows.append({"layout": layout, "full": full, "s2": s2, "added": s2 - full})
        print(f"| {layout} | {full:.0f} | {s2:.0f} | {s2 - full:.0f} |")
    if args.json:
        meta = {
            "device": args.device,
            "length": args.length,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "backend": args.backend,
            "unit": unit,
            "torch": torch.__version__,
            "date": str(date.today()),
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
