"""Quality over the course of training: a ``transformers`` callback that, every N
optimizer steps, measures the model being trained with full attention, then gives it
back to S2-Attn.

Each evaluation, on the main process only: perplexity (window-mean convention, a few
windows) at the original and the trained context, and RULER's ``niah_single_1`` (a few
samples, :mod:`longlora_plugin.evaluation.ruler`) at both. Results go to
``<out_dir>/progress.json`` (one record per evaluation, with its cost in seconds) and
``progress.png`` (both curves over the steps).

It must not change training: the model's training mode and attention backend, and the
Python, NumPy and torch (CPU and CUDA) random states are restored after each
evaluation, and no gradient is computed. The other ranks of a data-parallel run wait at
their next collective; a sharded model (ZeRO-3, FSDP) cannot be evaluated on one rank,
and the plugin refuses that combination.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from longlora_plugin.evaluation import perplexity, ruler, ruler_eval

LOG = logging.getLogger("longlora_plugin")
NIAH_TASK = "niah_single_1"


@contextmanager
def _training_untouched(model: Any):
    """Full attention and eval mode inside; the backend, the mode and every random
    state as they were afterwards."""
    import numpy as np

    from longlora_plugin.s2 import disable_s2_attn, unwrap_model

    base = unwrap_model(model)
    backend, training = base.config._attn_implementation, model.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    disable_s2_attn(model)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if base.config._attn_implementation != backend:
            base.set_attn_implementation(backend)
        model.train(training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class ProgressEval(TrainerCallback):
    """Evaluate every ``every`` steps at ``lengths`` (see the module docstring); ``docs``
    (may be empty: no perplexity) are the evaluation texts."""

    def __init__(
        self,
        every: int,
        out_dir: str | Path,
        lengths: Sequence[int],
        docs: Sequence[str],
        *,
        windows: int = 4,
        samples: int = 4,
    ) -> None:
        self.every, self.out_dir = every, Path(out_dir)
        self.lengths, self.docs = sorted(set(lengths)), list(docs)
        self.windows, self.samples = windows, samples
        self.records: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero or model is None:
            return
        tokenizer = processing_class or kwargs.get("tokenizer")
        start = time.perf_counter()
        with _training_untouched(model):
            record = {"step": state.global_step, **self.measure(model, tokenizer)}
        record["seconds"] = time.perf_counter() - start
        self.records.append(record)
        self.write()
        LOG.info(
            "longlora: progress eval at step %d (%.1f s): ppl %s, %s %s",
            record["step"],
            record["seconds"],
            record["ppl"],
            NIAH_TASK,
            record["niah"],
        )

    def measure(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """``{"ppl": {length: ppl}, "niah": {length: score}}`` (a length that cannot be
        built is left out)."""
        ppl: dict[int, float | None] = {}
        niah: dict[int, float] = {}
        for length in self.lengths:
            if self.docs:
                windows = perplexity.build_windows(
                    tokenizer,
                    self.docs,
                    convention=perplexity.WINDOW_MEAN,
                    length=length,
                    max_windows=self.windows,
                )
                ppl[length] = perplexity.evaluate(model, windows).ppl
            try:
                samples = [
                    ruler.build_sample(NIAH_TASK, tokenizer, length, f"progress/{i}")
                    for i in range(self.samples)
                ]
            except ValueError as err:
                LOG.info("longlora: progress eval: %s: no needle test at this length", err)
                continue
            scores = [ruler_eval.answer(model, tokenizer, s).score for s in samples]
            niah[length] = sum(scores) / len(scores)
        return {"ppl": ppl, "niah": niah}

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "every_n_steps": self.every,
            "lengths": self.lengths,
            "ppl": "window-mean convention, full attention",
            "niah": f"RULER {NIAH_TASK}, {self.samples} samples, string_match_all (%)",
            "evaluations": self.records,
        }
        (self.out_dir / "progress.json").write_text(json.dumps(payload, indent=2) + "\n")
        plot_progress(self.records, self.out_dir / "progress.png")


def plot_progress(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Perplexity and needle score per length over the steps, side by side."""
    from longlora_plugin.evaluation.report import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    steps = [r["step"] for r in records]
    lengths = sorted({int(n) for r in records for key in ("ppl", "niah") for n in r[key]})
    for index, length in enumerate(lengths):  # one colour per length in both panels
        for ax, key in ((left, "ppl"), (right, "niah")):
            values = [r[key].get(length, r[key].get(str(length))) for r in records]
            if any(v is not None for v in values):
                ax.plot(steps, values, marker="o", color=f"C{index}", label=f"{length} tokens")
    left.set(xlabel="step", ylabel="perplexity (window mean)", title="perplexity")
    right.set(xlabel="step", ylabel="score (%)", title=NIAH_TASK, ylim=(-5, 105))
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
