"""The demo's effect beyond the base context, as CI measures it
(``tests/demo/test_extension_effect.py``): passkey prompts at 2x C0 whose key lies more
than C0 tokens before the question (depths 0 and 0.25, the evaluation's keys), scored by

* **exact match**: the greedy answer is the key (what the demo's heatmap counts);
* **answer NLL**: the mean negative log-likelihood, nats per token, of the answer
  ``" <key>"`` after the prompt (teacher-forced): how well the model knows the key, where
  exact match only says whether every token won.

:func:`with_pretrained_rope` gives an adapter back the base model's RoPE: the answer NLL
there says whether the run learned the interpolated positions (a run trained with
interpolation loses the keys at the positions it was pre-trained with; one trained
without it is unchanged).

``python -m demo.effect --model NAME=PATH [--rope NAME=TYPE:FACTOR] ...`` prints both for
each model (and, for an adapter without ``--rope``, the answer NLL with the base model's
RoPE) and writes them as JSON (``--out``); with the adapters of
``python -m benchmarks.demo_ablations --only s2 --steps 250 --seed S`` it gives the
spread of the CI run over seeds (docs/demo.md, "The effect in CI").
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from demo.pretrain import CONTEXT
from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation.loss import IGNORE_INDEX, token_nll
from longlora_plugin.evaluation.models import ModelSpec, is_adapter_dir, load_eval_model
from longlora_plugin.evaluation.runner import load_models, run_passkey

LENGTH = 2 * CONTEXT
FAR = (0.0, 0.25)  # depths whose key lies more than C0 tokens before the question at 2x C0
TRIALS = 10  # keys per depth, the demo's


def far_accuracy(
    spec: ModelSpec,
    length: int = LENGTH,
    depths: Sequence[float] = FAR,
    trials: int = TRIALS,
) -> float:
    """Fraction of the keys (evaluation seed 0, ``trials`` per depth) found by greedy
    decoding (full attention, fp32, CPU); asserts that every depth was scored."""
    found = run_passkey(
        load_models([spec], dtype="float32", device="cpu"),
        lengths=[length],
        depths=depths,
        trials=trials,
        progress=False,
    )
    rows = found["results"]
    assert len(rows) == len(depths) > 0
    return sum(r["correct"] for r in rows) / sum(r["trials"] for r in rows)


def far_answer_nll(spec: ModelSpec, length: int = LENGTH, depths: Sequence[float] = FAR) -> float:
    """Mean NLL per answer token over the same prompts and keys as :func:`far_accuracy`."""
    item = load_eval_model(spec, dtype="float32", device="cpu")
    total, tokens = 0.0, 0
    assert depths
    for depth in depths:
        for trial in range(TRIALS):
            key = pk.trial_passkey(0, length, depth, trial)
            prompt = pk.build_prompt(item.tokenizer, length, depth, key)
            answer = item.tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            ids = prompt.input_ids + answer
            targets = [IGNORE_INDEX] * (len(prompt.input_ids) - 1) + answer
            nll = token_nll(item.model, torch.tensor([ids[:-1]]), torch.tensor([targets]))
            total += float(nll.sum())
            tokens += len(answer)
    return total / tokens


def with_pretrained_rope(adapter: Path, dest: Path) -> Path:
    """Copy the adapter output directory ``adapter`` to ``dest`` with its ``config.json``
    given the base model's ``rope_parameters`` and ``max_position_embeddings`` (the rest
    of the run's config kept); return ``dest``."""
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    pretrained = json.loads((Path(base) / "config.json").read_text())
    shutil.copytree(adapter, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((adapter / "config.json").read_text())
    for key in ("rope_parameters", "max_position_embeddings"):
        config[key] = pretrained[key]
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def main(argv: list[str] | None = None) -> None:
    from longlora_plugin.cli.eval import model_specs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--rope", action="append", help="NAME=TYPE:FACTOR, as in longlora eval")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/effect_spread_stats.json")
    )
    args = parser.parse_args(argv)
    rows = []
    for spec in model_specs(args.model, args.rope):
        row = {
            "model": spec.name,
            "path": spec.path,
            "exact_match": far_accuracy(spec),
            "answer_nll": round(far_answer_nll(spec), 4),
        }
        message = (
            f"{spec.name}: exact match {row['exact_match']:.2f}, answer NLL "
            f"{row['answer_nll']:.3f} nats/token"
        )
        if spec.rope is None and is_adapter_dir(spec.path):
            with tempfile.TemporaryDirectory() as scratch:
                copy = with_pretrained_rope(Path(spec.path), Path(scratch) / "adapter")
                nll = far_answer_nll(ModelSpec(spec.name, str(copy)))
            row["answer_nll_pretrained_rope"] = round(nll, 4)
            message += f", {nll:.3f} with the base model's RoPE"
        print(message, flush=True)
        rows.append(row)
    payload = {
        "measurement": "demo.effect",
        "length": LENGTH,
        "depths": list(FAR),
        "trials": TRIALS,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
