"""RULER on SmolLM2-135M-Instruct: base, interpolation only and LongLoRA at 4k/8k/16k, CPU.

The three models of ``docs/smollm2.md`` (``benchmarks/smollm2_eval.py``), evaluated with
what ``longlora eval ruler`` runs (:func:`longlora_plugin.evaluation.ruler_eval.run`):
greedy decoding, full attention, RULER's scoring, the essay haystack from the held-out
*Emma*. The model's chat template wraps every prompt (it is an Instruct model). Every task
gets ``--samples`` haystacks per length; the tasks whose haystack holds several keyed
needles (``niah_multikey_2``) ask ``--questions-per-haystack`` questions about each, with
one prefill. One model
per invocation, so the three can run one after another or on separate cores; each writes
``outputs/smollm2-ruler/<name>.json``. ``--merge`` combines those into
``benchmarks/results/smollm2-135m-ruler-cpu.json`` (with the summary over all models:
effective lengths and the regression line against ``base``), ``docs/img/smollm2-ruler.png``
and prints the markdown table.

Example (one CPU thread per model)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_ruler --model base
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_ruler --model interp-x2
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.smollm2_ruler --model longlora-16k
    .venv/bin/python -m benchmarks.smollm2_ruler --merge

Equivalent CLI (all models in one process)::

    longlora eval ruler --chat-template --data ~/.cache/longlora_plugin/austen/emma.txt \\
      --model base=outputs/smollm2-135m-instruct \\
      --model interp-x2=outputs/smollm2-135m-instruct --rope interp-x2=linear:2 \\
      --model longlora-16k=outputs/smollm2-135m-16k-cpu --lengths 4096,8192,16384 \\
      --tasks niah_single_1,niah_single_2,niah_multikey_2,vt --samples 1 --dtype float32 \\
      --device cpu   # the script: 4 questions about the niah_multikey_2 haystack
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks.smollm2_eval import ADAPTER_DIR, MODEL_DIR, REPO, model_specs

PARTS = REPO / "outputs" / "smollm2-ruler"
RESULT = REPO / "benchmarks" / "results" / "smollm2-135m-ruler-cpu.json"
PLOT = REPO / "docs" / "img" / "smollm2-ruler.png"
MODELS = ("base", "interp-x2", "longlora-16k")


def evaluate(args: argparse.Namespace) -> Path:
    import torch

    from demo.corpora import austen_novels
    from longlora_plugin.evaluation import ruler_eval, ruler_tasks
    from longlora_plugin.evaluation.models import load_eval_model
    from longlora_plugin.evaluation.ruler_prompts import sentences

    emma = austen_novels()["emma"]
    essay = sentences(emma.read_text(encoding="utf-8"))
    item = load_eval_model(
        model_specs(args.model_dir, args.adapter_dir)[args.model], dtype="float32", device="cpu"
    )
    started = time.perf_counter()
    parts = []
    for task in args.tasks.split(","):  # --samples haystacks per task and length
        questions = min(args.questions_per_haystack, ruler_tasks.max_questions(task))
        parts.append(
            ruler_eval.run(
                [item],
                lengths=[int(n) for n in args.lengths.split(",")],
                tasks=[task],
                samples=args.samples * questions,
                questions_per_haystack=questions,
                essay=essay,
                data=str(emma),
                chat_template=True,
            )
        )
    payload = dict(parts[0])
    for key in ("results", "samples", "skipped"):
        payload[key] = [row for part in parts for row in part[key]]
    payload["settings"] = {
        **parts[0]["settings"],
        "tasks": args.tasks.split(","),
        "samples": f"{args.samples} haystack(s) per cell",
        "questions_per_haystack": args.questions_per_haystack,
    }
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    payload["torch_threads"] = torch.get_num_threads()
    PARTS.mkdir(parents=True, exist_ok=True)
    path = PARTS / f"{args.model}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"{args.model}: {payload['wall_s']} s, wrote {path}", file=sys.stderr)
    return path


def merge(args: argparse.Namespace) -> Path:
    import torch

    from longlora_plugin.evaluation.report import plot_ruler, ruler_table
    from longlora_plugin.evaluation.ruler_eval import summarize

    parts = [json.loads((PARTS / f"{m}.json").read_text()) for m in MODELS]
    merged = dict(parts[0])
    for key in ("models", "results", "samples", "skipped"):
        merged[key] = [row for p in parts for row in p[key]]
    settings = merged["settings"]
    merged["summary"] = summarize(
        merged["models"], merged["results"], settings["threshold"], settings["relative"]
    )
    result = {
        "benchmark": "RULER, SmolLM2-135M-Instruct base / interpolation x2 / LongLoRA 16k, CPU",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": {m: p["torch_threads"] for m, p in zip(MODELS, parts, strict=True)},
        },
        "eval_wall_s": {m: p["wall_s"] for m, p in zip(MODELS, parts, strict=True)},
        "ruler": merged,
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_ruler(merged, PLOT)
    print(ruler_table(merged))
    print(f"wrote {RESULT} and {PLOT}", file=sys.stderr)
    return RESULT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, help="evaluate this model")
    parser.add_argument("--merge", action="store_true", help="combine the three models")
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_2,vt")
    parser.add_argument("--samples", type=int, default=1, help="haystacks per task and length")
    parser.add_argument("--questions-per-haystack", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--adapter-dir", type=Path, default=ADAPTER_DIR)
    args = parser.parse_args(argv)
    if args.model:
        evaluate(args)
    if args.merge:
        merge(args)
    if not (args.model or args.merge):
        parser.error("give --model NAME, --merge, or both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
