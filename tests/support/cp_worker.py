"""One rank of the S2 context-parallel equality check, run under ``torch.distributed.run``
(gloo, CPU): ``python -m torch.distributed.run --nproc_per_node P -m tests.support.cp_worker OUT``.

For every case (architecture x row layout x group size) each rank builds the same tiny
model twice: single-process S2 on the whole rows (the reference, computed on every rank)
and S2 split over the ranks (``enable_s2_attn(..., context_parallel=cp)`` with batches
from ``cp.shard``). It compares the loss (summed over ranks), this rank's logits and every
parameter gradient (summed over ranks), records the bytes each attention call sent, and
runs the leak check: perturbing tokens from ``j`` on leaves every output before ``j``
unchanged. It also gathers micro-batches of different lengths (``gather_rows``).
Writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from longlora_plugin import enable_s2_attn
from longlora_plugin.s2.context_parallel import ContextParallel
from longlora_plugin.s2.row_gather import gather_rows
from s2_harness.models import configs

LENGTH = 48
ARCHS = ("llama", "llama-9-3", "mistral-window")
LAYOUTS = ("plain", "padded", "packed")
GROUPS = (8, 12, 24, 32)
LEAK_AT = 20


def rows(layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, LENGTH), generator=gen)
    batch = {"input_ids": ids}
    if layout == "padded":  # row 1: the last 13 tokens are padding (all of rank 3's at P=4)
        mask = torch.ones(2, LENGTH, dtype=torch.long)
        mask[1, 35:] = 0
        batch["attention_mask"] = mask
    if layout == "packed":  # documents of 13, 19 and 16 tokens
        pos = torch.cat([torch.arange(13), torch.arange(19), torch.arange(16)])
        batch["position_ids"] = pos[None].expand(2, -1).clone()
    labels = ids.clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def items(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the loss counts (labels shifted by one, as the causal-LM loss does)."""
    return (batch["labels"][:, 1:] != -100).sum()


def run_case(arch: str, layout: str, group: int, cp: ContextParallel) -> dict:
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(configs()[arch], attn_implementation="sdpa")
    split = copy.deepcopy(reference)
    enable_s2_attn(reference, group_size=group)
    enable_s2_attn(split, group_size=group, context_parallel=cp)
    batch = rows(layout)
    count = items(batch)
    reference.train()
    split.train()
    out = reference(**batch, num_items_in_batch=count)
    out.loss.backward()
    local = cp.shard(batch)
    cp.sent_bytes.clear()
    mine = split(**local, num_items_in_batch=count)
    mine.loss.backward()
    loss = mine.loss.detach().clone()
    dist.all_reduce(loss, group=cp.group)
    chunk = LENGTH // cp.size
    cut = slice(cp.rank * chunk, (cp.rank + 1) * chunk)
    valid = batch.get("attention_mask", torch.ones(2, LENGTH))[:, cut, None].bool()
    logits_diff = ((mine.logits - out.logits[:, cut]).detach() * valid).abs().max()
    grad_diff = 0.0
    grads = dict(reference.named_parameters())
    for name, param in split.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=cp.group)
        grad_diff = max(grad_diff, float((grad - grads[name].grad).abs().max()))
    record = {
        "arch": arch,
        "layout": layout,
        "group": group,
        "loss_diff": float((loss - out.loss.detach()).abs()),
        "logits_diff": float(logits_diff),
        "grad_diff": grad_diff,
        "sent_bytes": list(cp.sent_bytes),
        "config": {
            "heads": split.config.num_attention_heads,
            "kv_heads": split.config.num_key_value_heads,
            "head_dim": split.config.hidden_size // split.config.num_attention_heads,
            "layers": split.config.num_hidden_layers,
        },
    }
    if (arch, layout, group) == ("llama", "packed", 8):
        record["leak_diff"] = leak(split, batch, cp, mine.logits.detach())
        split.eval()
        try:
            split(**local)
        except NotImplementedError as err:
            record["eval_error"] = str(err)
    return record


@torch.no_grad()
def leak(split, batch: dict[str, torch.Tensor], cp: ContextParallel, before: torch.Tensor):
    """Largest change of this rank's outputs at positions < LEAK_AT when every token from
    LEAK_AT on is replaced (training-mode forward, so S2-CP runs)."""
    changed = dict(batch)
    ids = batch["input_ids"].clone()
    ids[:, LEAK_AT:] = (ids[:, LEAK_AT:] + 37) % 95 + 1
    changed["input_ids"] = ids
    after = split(**cp.shard(changed)).logits
    chunk = LENGTH // cp.size
    positions = torch.arange(cp.rank * chunk, (cp.rank + 1) * chunk)
    earlier = positions < LEAK_AT
    changed_after = float((after - before)[:, ~earlier].abs().max()) if (~earlier).any() else 0.0
    return {
        "earlier": float((after - before)[:, earlier].abs().max()) if earlier.any() else 0.0,
        "later": changed_after,
    }


def gathered_rows(cp: ContextParallel) -> dict:
    """``gather_rows`` on micro-batches whose length differs by rank (10 + 3r tokens):
    each rank's rows come back first-to-last, padded at the end to the longest length
    rounded up to a multiple of P."""

    def batch_of(rank: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(10 + 3 * rank)[None].repeat(2, 1) + 100 * rank
        return {
            "input_ids": ids,
            "labels": ids + 1,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(ids.shape[1])[None].repeat(2, 1),
        }

    rows = gather_rows(batch_of(cp.rank), cp)
    kept = padded = True
    for j, row in enumerate(rows):
        mine = batch_of(j)
        n = mine["input_ids"].shape[1]
        kept &= all(torch.equal(row[k][:, :n], v) for k, v in mine.items())
        padded &= bool((row["labels"][:, n:] == -100).all())
        padded &= bool((row["attention_mask"][:, n:] == 0).all())
        length = row["input_ids"].shape[1]
        padded &= torch.equal(row["position_ids"][0], torch.arange(length))
    return {"lengths": [r["input_ids"].shape[1] for r in rows], "kept": kept, "padded": padded}


def main(out: str, only: str = "") -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    cp = ContextParallel()
    records = [
        run_case(arch, layout, group, cp)
        for arch in ARCHS
        for layout in LAYOUTS
        for group in GROUPS
        if not only or only == f"{arch}/{layout}/{group}"
    ]
    path = Path(out) / f"rank{cp.rank}.json"
    payload = {"size": cp.size, "cases": records, "gathered": gathered_rows(cp)}
    path.write_text(json.dumps(payload, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
