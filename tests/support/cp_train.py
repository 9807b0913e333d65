"""LongLoRA training with S2-Attn context parallelism, through the plugin's public
functions, for ``tests/s2/test_context_parallel.py``: run it under
``python -m torch.distributed.run --nproc_per_node W -m tests.support.cp_train BASE DATA OUT
--cp P``.

The model is the one ``tests/support/fsdp2_train.py`` builds as the plugin does in Axolotl
(RoPE linear to 256 positions, LoRA r4 on q/k/v/o, embeddings and norms trained in full,
S2-Attn G=64), here with ``context_parallel``: each 256-token row is split over the ``P``
ranks of a context-parallel group (``context_parallel_groups``), and ``W / P``
data-parallel replicas each take their own row (the same rows at every step). Every rank also trains a twin of
the model without context parallelism on the same rows, one whole row per replica, in
one process (the single-process reference). Writes ``OUT/rank<r>.json`` with both runs'
losses per step, the largest difference of the trainable parameters at the end, and this
rank's peak number of sent bytes per layer.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.support.fsdp2_train import GROUP_SIZE, SEQUENCE_LEN, _rows, build

LR = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--cp", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from longlora_plugin import enable_s2_attn
    from longlora_plugin.s2.context_parallel import context_parallel_groups, reduce_gradients

    cp, dp = context_parallel_groups(args.cp)
    replicas = dist.get_world_size() // args.cp
    replica = dist.get_rank() // args.cp
    reference, _ = build(Path(args.base))
    model = copy.deepcopy(reference)
    enable_s2_attn(model, group_size=GROUP_SIZE, context_parallel=cp)
    rows = _rows(AutoTokenizer.from_pretrained(args.base), Path(args.data), replicas)
    runs = {"split": model, "single": reference}
    optims = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
        for name, m in runs.items()
    }
    losses: dict[str, list[float]] = {"split": [], "single": []}
    batch = rows[:replicas]  # the same rows at every step: the loss must fall
    count = torch.tensor(SEQUENCE_LEN - 1)  # tokens scored per row
    for _ in range(args.steps):
        for m in runs.values():
            m.train()
        # single process: every replica's row, each as its own mean, averaged
        total = 0.0
        for row in batch:
            loss = reference(input_ids=row[None], labels=row[None]).loss / replicas
            loss.backward()
            total += loss.item()
        losses["single"].append(total)
        # context parallel: this rank's chunk of its replica's row
        row = batch[replica][None]
        local = cp.shard({"input_ids": row, "labels": row})
        loss = model(**local, num_items_in_batch=count).loss
        loss.backward()
        reduce_gradients((p for p in model.parameters() if p.requires_grad), cp, dp)
        value = loss.detach().clone()
        dist.all_reduce(value)  # sum over the CP group = the row's loss; sum over replicas
        losses["split"].append(value.item() / replicas)
        for optim in optims.values():
            optim.step()
            optim.zero_grad()
    params = dict(reference.named_parameters())
    worst = max(
        float((p.detach() - params[n].detach()).abs().max())
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    record = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "cp": args.cp,
        "losses": losses,
        "param_diff": worst,
        "sent_bytes_max": max(cp.sent_bytes),
        "attn_implementation": model.get_base_model().config._attn_implementation,
    }
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
