"""``longlora.context_parallel: P`` in ``axolotl train``: S2-Attn with each row split over
``P`` processes (:mod:`longlora_plugin.s2.context_parallel`), hosted by the Trainer.

Axolotl's own ``context_parallel_size`` cannot host it: it requires flash-attn and the
ring-flash-attn package and patches ring (full) attention into the model. Here the data
pipeline stays Axolotl's: every rank loads its own micro-batch, as under plain data
parallelism. :func:`split_rows` replaces the trainer's ``training_step``: the ``P`` ranks of
a context-parallel group gather their ``P`` micro-batches and run one sub-step per
micro-batch, each rank on its ``L / P``-token chunk, with the loss normalised by the
micro-batch owner's token count (the Trainer's ``num_items_in_batch``, else the
micro-batch's scored tokens: the mean the model takes without splitting). Gradients accumulate over the sub-steps and
are synchronised after the last, like gradient accumulation: DDP or DeepSpeed then
averages over all ``W`` ranks, and ``1/W * sum over ranks of (sum over micro-batches of
a chunk's gradient)`` is exactly the average over the ``W`` micro-batches that data
parallelism computes without splitting. The returned (logged) loss is this rank's share;
its mean over the ranks, which the Trainer logs, is the usual mean loss.

Evaluation (``val_set_size``) runs whole rows per rank with full attention, as without
context parallelism.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist

from longlora_plugin.s2 import disable_s2_attn, unwrap_model
from longlora_plugin.s2.context_parallel import ContextParallel
from longlora_plugin.s2.row_gather import gather_rows


@contextlib.contextmanager
def _accumulating(trainer: Any, model: Any):
    """A sub-step whose gradients are kept for the next: no DDP all-reduce, no
    DeepSpeed optimizer step (accelerate reads ``sync_gradients`` for both)."""
    state = trainer.accelerator.gradient_state
    before = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        with trainer.accelerator.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(before)


def _owner_counts(num_items_in_batch: Any, cp: ContextParallel, device: Any) -> list[Any]:
    """Each group rank's ``num_items_in_batch`` (the scored tokens its loss divides by)."""
    local = torch.as_tensor(num_items_in_batch, device=device).reshape(1)
    counts = [torch.empty_like(local) for _ in range(cp.size)]
    dist.all_gather(counts, local, group=cp.group)
    return [c[0] for c in counts]


def _scored_tokens(row: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens a causal-LM loss scores in a micro-batch: labels after the first, not -100."""
    return row["labels"][:, 1:].ne(-100).sum()


def split_rows(trainer: Any, cp: ContextParallel) -> None:
    """Make ``trainer`` (a transformers ``Trainer``) train with rows split over ``cp``'s
    ranks (see the module), and evaluate with whole rows and full attention."""
    if getattr(trainer, "label_smoother", None) is not None:
        raise NotImplementedError(
            "longlora.context_parallel cannot combine with label smoothing "
            "(label_smoothing_factor): the smoother shifts the labels inside each chunk, so "
            "a chunk's last token would lose its target (the next chunk's first token); "
            "set label_smoothing_factor: 0 or context_parallel: 1"
        )
    step = trainer.training_step

    @functools.wraps(step)
    def training_step(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        inputs = trainer._prepare_inputs(inputs)
        rows = gather_rows(inputs, cp)
        if num_items_in_batch is not None:  # the Trainer's count: this rank's or global
            counts = _owner_counts(num_items_in_batch, cp, inputs["input_ids"].device)
        total = None
        for j, row in enumerate(rows):
            chunk = cp.shard(row)
            if num_items_in_batch is None:
                # the model would average over the chunk: make it divide by the owner's
                # micro-batch, as its loss does without splitting
                chunk["num_items_in_batch"] = _scored_tokens(row)
            last = j == len(rows) - 1
            with contextlib.nullcontext() if last else _accumulating(trainer, model):
                loss = step(model, chunk, None if num_items_in_batch is None else counts[j])
            total = loss if total is None else total + loss
        return total

    evaluate = trainer.evaluate

    @functools.wraps(evaluate)
    def evaluate_whole_rows(*args: Any, **kwargs: Any):
        base = unwrap_model(trainer.model)
        backend = base.config._attn_implementation
        disable_s2_attn(base)
        try:
            return evaluate(*args, **kwargs)
        finally:
            base.set_attn_implementation(backend)

    trainer.training_step = training_step
    trainer.evaluate = evaluate_whole_rows
