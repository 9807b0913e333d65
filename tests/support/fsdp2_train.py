"""FSDP2 (``torch.distributed.fsdp.fully_shard``) training with the plugin's public
functions, for ``tests/axolotl/test_sharding.py``: run it under
``python -m torch.distributed.run --nproc_per_node 2 -m tests.support.fsdp2_train``.

Why not ``axolotl train`` or the HF ``Trainer``: both build their FSDP through
accelerate, whose ``AcceleratorState`` picks FSDP only for accelerator process groups
(MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), never for CPU processes (MULTI_CPU or NO):
``accelerate/state.py``, ``AcceleratorState.__init__``. So on CPU this script shards the
same way accelerate's FSDP2 does (``fully_shard`` per decoder layer, then the root) and
applies what the plugin does in Axolotl's hooks through its public functions:
:func:`longlora_plugin.rope.resolve_rope`, :func:`longlora_plugin.trainable.find_trainable_modules`
(PEFT ``modules_to_save``, ``ensure_weight_tying``) and :func:`longlora_plugin.enable_s2_attn`.

Embeddings: an untied input embedding and LM head each get their own FSDP unit, so they
are not gathered with the root for the whole step; tied ones share one weight and so stay
in one unit, the root. Checkpoints are torch.distributed.checkpoint (DCP) shards of the
model, optimizer and LR schedule; the final adapter is saved from the gathered full state
dict. Each rank writes ``<out>/rank_probe/rank<N>.json`` as the Axolotl probe plugin does
(``tests/support/rank_probe_plugin.py``); rank 0 also writes the gathered trained
``modules_to_save`` tensors to ``rank_probe/trained_modules_to_save.safetensors``.

Arguments: ``BASE_MODEL DATA_JSONL OUT_DIR [--steps N] [--save-steps N]
[--kill-after-save N] [--resume CHECKPOINT_DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

SEQUENCE_LEN = 256
GROUP_SIZE = 64
LR = 1e-3


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--kill-after-save", type=int, default=0)
    parser.add_argument("--resume", default=None)
    return parser.parse_args()


def _rows(tokenizer, data: Path, world: int) -> torch.Tensor:
    """The jsonl documents, tokenized, concatenated with EOS and cut into full rows;
    trimmed to a multiple of ``world`` so every rank gets the same number of rows."""
    ids: list[int] = []
    for line in data.read_text(encoding="utf-8").splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // SEQUENCE_LEN // world * world
    return torch.tensor(ids[: n * SEQUENCE_LEN]).view(n, SEQUENCE_LEN)


def build(base: Path):
    """The LongLoRA model as the plugin builds it in Axolotl: RoPE interpolated to
    ``SEQUENCE_LEN``, LoRA r4 on q/k/v/o plus embeddings and norms in full, S2-Attn."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from longlora_plugin import enable_s2_attn
    from longlora_plugin.rope import resolve_rope
    from longlora_plugin.trainable import find_trainable_modules

    config = AutoConfig.from_pretrained(base)
    rope = resolve_rope(config, rope_type="linear", factor="auto", sequence_len=SEQUENCE_LEN)
    for key, value in rope.config_overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(
        base, config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    found = find_trainable_modules(config, ["embed", "norm"], model=model)
    torch.manual_seed(42)  # the LoRA init, the same on every rank
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=found.names,
        ensure_weight_tying=found.ensure_weight_tying,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    enable_s2_attn(model, group_size=GROUP_SIZE)
    return model, found


def shard(model) -> None:
    """``fully_shard`` each decoder layer, the untied embedding and head, then the root."""
    inner = model.get_base_model()
    for layer in inner.model.layers:
        fully_shard(layer)
    if not inner.config.tie_word_embeddings:
        fully_shard(inner.model.embed_tokens)
        fully_shard(inner.lm_head)
    fully_shard(model)


def _full(param: torch.Tensor) -> torch.Tensor:
    full = param.full_tensor() if hasattr(param, "full_tensor") else param
    return full.detach().clone().cpu()


def main() -> None:
    args = _parse()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from longlora_plugin.s2.backend import s2_settings

    out = Path(args.out)
    probe = out / "rank_probe"
    model, found = build(Path(args.base))
    shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, args.steps)
    start = 0
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        scheduler.load_state_dict(state["scheduler"])
        start = int(json.loads((Path(args.resume) / "step.json").read_text())["step"])

    rows = _rows(AutoTokenizer.from_pretrained(args.base), Path(args.data), world)
    base = model.get_base_model()
    record = {
        "rank": rank,
        "world_size": world,
        "first_step": start + 1,
        "attn_implementation": base.config._attn_implementation,
        "rope_parameters": dict(base.config.rope_parameters),
        "s2_group_size": s2_settings(model).group_size,
        "ensure_weight_tying": found.ensure_weight_tying,
        "trainable_embed": [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and "embed_tokens.modules_to_save" in n
        ],
        "trainable_norm": [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and "norm.modules_to_save" in n
        ],
        "trainable_lora": len(
            [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        ),
        "losses": {},
        "learning_rates": {},
    }
    model.train()
    for step in range(start + 1, args.steps + 1):
        batch = rows[(step - 1) * world + rank].unsqueeze(0)  # each rank its own row
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        record["learning_rates"][step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        record["losses"][step] = mean.item() / world
        if step % args.save_steps == 0 and step < args.steps:
            checkpoint = out / f"checkpoint-{step}"
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}
            dcp.save(state, checkpoint_id=str(checkpoint))
            if rank == 0:
                (checkpoint / "step.json").write_text(json.dumps({"step": step}))
            dist.barrier()
            if step == args.kill_after_save:
                os._exit(17)  # a run killed right after its checkpoint

    # every rank gathers (a collective); rank 0 writes
    trained = {n: _full(p) for n, p in model.named_parameters() if ".modules_to_save." in n}
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    record["steps"] = args.steps
    record["trained_digests"] = {
        n: hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()
        for n, t in trained.items()
    }
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank{rank}.json").write_text(json.dumps(record, indent=2))
    if rank == 0:
        from safetensors.torch import save_file

        save_file(trained, str(probe / "trained_modules_to_save.safetensors"))
        model.save_pretrained(str(out), state_dict=full)
        base.config.save_pretrained(str(out))
    dist.barrier()
    dist.destroy_process_group()
    assert math.isfinite(record["losses"][args.steps])


if __name__ == "__main__":
    main()
