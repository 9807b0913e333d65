"""Pre-training of the demo's base model: a small Llama that reads novels and retrieves a
passkey or a RULER needle inside its own context C0.

Why not ``axolotl train`` here: Axolotl averages the loss over every labelled token of a
batch, so the few answer tokens of the retrieval documents are ~2% of the signal next to
the novels, and an 8-layer model did not start copying in 1000 steps (passkey accuracy 0 at
C0, 2026-12-03); with this loop's loss but novels from the start, not in 800 steps either.
This loop first trains on retrieval documents alone (:mod:`demo.retrieval_docs`, training
seeds only; loss on the answers), then on batches of half novel windows and half retrieval
documents with the mean loss over the novel tokens plus the mean loss over the answers. The extension to 4x C0 (``make demo``)
goes through ``axolotl train`` with the plugin, on the same mix.

Regenerate the shipped model (``demo/base_model/``, its ``recipe.json`` holds the loss and
probe accuracy along the way)::

    OMP_NUM_THREADS=2 python -m demo.pretrain
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from demo.retrieval_docs import niah_docs, passkey_docs

SHIPPED = Path(__file__).resolve().parent / "base_model"
COMMAND = "OMP_NUM_THREADS=2 python -m demo.pretrain"

CONTEXT = 256  # C0: the base model's whole context
VOCAB_SIZE = 2048
# 8 layers: under S2-Attn with the paper's G = L/4 a token reaches about G + (layers - 1) * G/2 back,
# so 8 layers (4.5 G) carry a needle across a whole 4G training row; 4 would not (2.5 G).
MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
RECIPE: dict[str, Any] = {
    "retrieval_steps": 600,  # first: retrieval documents only, 16 per batch
    "steps": 1800,  # in all; after the retrieval steps, the mix
    "novel_rows": 8,  # per batch, CONTEXT tokens each
    "retrieval_rows": 8,  # per batch, half passkey, half niah
    "lr": 1e-3,
    "warmup": 50,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "seed": 0,
}
PROBE_SEED = 7  # passkey keys for the progress probe: neither training nor evaluation (0)


def novel_windows(texts: list[str], tokenizer: Any, context: int) -> list[list[int]]:
    """The training novels as consecutive ``context``-token windows (BOS first)."""
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - context + 2, context - 1):
            windows.append([tokenizer.bos_token_id, *ids[start : start + context - 1]])
    return windows


def retrieval_examples(tokenizer: Any, context: int, count: int) -> list[tuple[list[int], int]]:
    """``(ids, answer_tokens)``: half passkey, half niah documents with their answer
    (`` 12345.``), cut to ``context`` tokens; the loss covers the last ``answer_tokens``.
    A niah document over ``context`` (the longest draws) thus has its answer cut and
    other tokens labelled: a flaw of the recipe that made the shipped model, kept so that
    this code reproduces it."""
    docs = [
        *passkey_docs(tokenizer, context, count // 2),
        *niah_docs(tokenizer, context, count // 2),
    ]
    out = []
    for prompt, answer in docs:
        ids = tokenizer(prompt + answer)["input_ids"][:context]
        out.append((ids, len(tokenizer(answer, add_special_tokens=False)["input_ids"])))
    return out


def _batches(items: list, size: int, rng: random.Random) -> Iterator[list]:
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [items[j] for j in order[i : i + size]]


def _retrieval_loss(model: Any, rows: list[tuple[list[int], int]], pad: int) -> torch.Tensor:
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (row, answer) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        labels[b, len(row) - answer : len(row)] = torch.tensor(row[len(row) - answer :])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@torch.no_grad()
def probe(model: Any, tokenizer: Any, context: int, trials: int = 10) -> float:
    """Passkey accuracy at ``context`` tokens over depths 0/0.5/1 (keys of PROBE_SEED)."""
    from longlora_plugin.evaluation import passkey as pk

    model.eval()
    hits = 0
    for depth in (0.0, 0.5, 1.0):
        for trial in range(trials):
            key = pk.trial_passkey(PROBE_SEED, context, depth, trial)
            hits += pk.retrieve(model, tokenizer, pk.build_prompt(tokenizer, context, depth, key))[
                1
            ]
    model.train()
    return hits / (3 * trials)


def pretrain(
    texts: list[str], out: Path, steps: int | None = None, **changes: Any
) -> dict[str, Any]:
    """Build the tokenizer and the random model, pre-train (:data:`RECIPE`) and save the model
    (fp16 weights), its tokenizer and ``recipe.json`` in ``out``; returns the log."""
    from transformers import AutoModelForCausalLM

    from demo.tiny_models import build_tokenizer, tiny_config

    started = time.time()
    recipe = {**RECIPE, **changes, "steps": steps or RECIPE["steps"]}
    rng = random.Random(recipe["seed"])
    tokenizer = build_tokenizer(out, vocab_size=VOCAB_SIZE, texts=texts)
    config = tiny_config(
        "llama", vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, **MODEL
    )
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    novels = novel_windows(texts, tokenizer, CONTEXT)
    examples = retrieval_examples(
        tokenizer, CONTEXT, recipe["steps"] * recipe["retrieval_rows"] // 2
    )
    first = recipe["retrieval_steps"]
    optim = torch.optim.AdamW(
        model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"], betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:
        if step < recipe["warmup"]:
            return (step + 1) / recipe["warmup"]
        done = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
        low = recipe["min_lr_ratio"]
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * done))

    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    novel_batches = _batches(novels, recipe["novel_rows"], rng)
    retrieval_batches = _batches(examples, recipe["retrieval_rows"], rng)
    log: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(recipe["steps"]), desc="pre-training the base model", unit="step")
    text_loss = torch.tensor(math.nan)
    for step in bar:
        rows = next(retrieval_batches)
        if step < first:  # the retrieval circuit first: the novels' loss would drown it
            rows += next(retrieval_batches)
            loss = answer_loss = _retrieval_loss(model, rows, tokenizer.pad_token_id)
        else:
            text_ids = torch.tensor(next(novel_batches))
            text_loss = model(input_ids=text_ids, labels=text_ids).loss
            answer_loss = _retrieval_loss(model, rows, tokenizer.pad_token_id)
            loss = text_loss + answer_loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        if (step + 1) % 200 == 0 or step + 1 == recipe["steps"]:
            entry = {
                "step": step + 1,
                "text_loss": round(text_loss.item(), 4) if step >= first else None,
                "answer_loss": round(answer_loss.item(), 4),
                "passkey_at_C0": probe(model, tokenizer, CONTEXT),
            }
            log.append(entry)
            bar.write(json.dumps(entry))
    model.half().save_pretrained(out)
    record = {
        "command": COMMAND,
        "context": CONTEXT,
        "model": MODEL,
        "vocab_size": VOCAB_SIZE,
        "recipe": recipe,
        "novel_windows": len(novels),
        "retrieval_documents": len(examples),
        "log": log,
        "seconds": round(time.time() - started),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers")},
        "python": sys.version.split()[0],
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def fingerprint(texts: list[str]) -> str:
    """Hash of what the base model depends on: the training text and this recipe."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    digest.update(json.dumps([CONTEXT, VOCAB_SIZE, MODEL, RECIPE], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.pretrain", description=__doc__)
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--steps", type=int, help="override the recipe's steps (not the recipe)")
    parser.add_argument("--lr", type=float, help="override the recipe's lr (not the recipe)")
    args = parser.parse_args(argv)
    from demo.text import load_demo_text

    torch.manual_seed(0)
    texts = list(load_demo_text(None, None).train.values())
    args.out.mkdir(parents=True, exist_ok=True)
    changes = {"lr": args.lr} if args.lr else {}
    record = pretrain(texts, args.out, args.steps, **changes)
    record["fingerprint"] = None if args.steps or changes else fingerprint(texts)
    (args.out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.out}: {record['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
