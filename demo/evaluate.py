"""Evaluation step of the CPU demo: three models on the held-out text.

The models are the base model as pre-trained (``base``), the same weights with the RoPE
interpolation LongLoRA trains with and no training (``interpolation``), and the LongLoRA adapter
(``longlora``); all with full attention. Perplexity uses the paper's window-mean
convention; passkey retrieval is tried on the base model at its own context first and
run at the longer lengths only if the base model can do it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation import perplexity as pp
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride
from longlora_plugin.evaluation.runner import load_models, run_passkey, run_ppl, save
from longlora_plugin.evaluation.texts import load_texts

RULER_SAMPLES = 2

PASSKEY_TRIALS = 10
PASSKEY_DEPTHS = (0.0, 0.5, 1.0)
PASSKEY_USABLE = 0.5  # base-model accuracy at its own context needed to go further


def demo_models(out: Path, factor: float, rope_type: str) -> dict[str, ModelSpec]:
    """The three models of the demo, by key; ``rope_type`` x ``factor`` is the
    interpolation of the untrained row."""
    base = str(out / "base")
    return {
        "base": ModelSpec("base", base),
        "interpolation": ModelSpec(
            f"base + {rope_type} x{factor:g}, no training",
            base,
            RopeOverride(rope_type, factor),
        ),
        "longlora": ModelSpec("LongLoRA", str(out / "longlora")),
    }


def evaluate_demo(
    out: Path, heldout: Path, lengths: Any, *, rope_type: str, max_windows: int
) -> dict[str, Any]:
    """Perplexity of the three models at ``lengths.eval_lengths`` and the passkey test;
    writes ``ppl.*`` and ``passkey.*`` into ``out``. Returns ``{"ppl": {key: {length:
    ppl}}, "table": markdown, "plot": path, "passkey_note": text}``."""
    specs = demo_models(out, lengths.factor, rope_type)
    docs = load_texts(str(heldout))
    payload = run_ppl(
        load_models(list(specs.values()), dtype="float32", device="cpu"),
        docs,
        lengths=lengths.eval_lengths,
        conventions=(pp.WINDOW_MEAN,),
        max_windows=max_windows,
        batch_size=8,
        data=str(heldout),
    )
    paths = save(payload, out, echo=None)
    names = {spec.name: key for key, spec in specs.items()}
    ppl: dict[str, dict[int, float]] = {key: {} for key in specs}
    for row in payload["results"]:
        ppl[names[row["model"]]][row["length"]] = row["ppl"]
    return {
        "ppl": ppl,
        "table": _table(ppl, specs, lengths, payload),
        "plot": str(paths["png"]),
        "passkey_note": _passkey(out, specs, lengths) + "\n\n" + _ruler(specs, lengths),
    }


def _table(
    ppl: dict[str, dict[int, float]], specs: dict[str, ModelSpec], lengths: Any, payload
) -> str:
    cols = lengths.eval_lengths
    own = ppl["base"][lengths.base]
    header = " | ".join(f"{n} ({n // lengths.base}x)" for n in cols)
    lines = [
        f"Perplexity on the held-out text ({pp.WINDOW_MEAN}: {pp.CONVENTIONS[pp.WINDOW_MEAN]}); "
        f"in brackets: ratio to the base model at its own {lengths.base}-token context",
        "",
        f"| model | {header} |",
        "|---|" + "---:|" * len(cols),
    ]
    for key, spec in specs.items():
        cells = [f"{ppl[key][n]:.2f} ({ppl[key][n] / own:.2f}x)" for n in cols]
        lines.append(f"| {spec.name} | " + " | ".join(cells) + " |")
    windows = {r["length"]: r["windows"] for r in payload["results"]}
    lines.append("")
    lines.append("windows per length: " + ", ".join(f"{n}: {windows[n]}" for n in cols))
    return "\n".join(lines)


def _ruler(specs: dict[str, ModelSpec], lengths: Any, samples: int = RULER_SAMPLES) -> str:
    """RULER (``longlora eval ruler``) on the tasks whose shortest sample fits the base
    model's context, at the evaluation lengths, for the three models; or the sentence
    saying that none fits."""
    from transformers import AutoTokenizer

    from longlora_plugin.evaluation import ruler, ruler_eval, ruler_tasks
    from longlora_plugin.evaluation.report import ruler_table

    tokenizer = AutoTokenizer.from_pretrained(specs["base"].path)
    offline = [name for name, task in ruler_tasks.TASKS.items() if task.haystack != "essay"]
    limit = max(lengths.eval_lengths)
    shortest = {name: ruler.shortest_length(name, tokenizer, limit=limit) for name in offline}
    fitting = [name for name, n in shortest.items() if n is not None and n <= lengths.base]
    needed = ", ".join(f"{name} {n or f'> {limit}'}" for name, n in shortest.items())
    if not fitting:
        return (
            f"RULER: not run. Its shortest samples with this tokenizer ({needed} tokens, "
            "prompt plus answer budget) do not fit the base model's "
            f"{lengths.base}-token context, so no task can be scored at its own length."
        )
    payload = ruler_eval.run(
        load_models(list(specs.values()), dtype="float32", device="cpu"),
        lengths=lengths.eval_lengths,
        tasks=fitting,
        samples=samples,
        progress=False,
    )
    return "RULER (tasks that fit the base context):\n\n" + ruler_table(payload)


def _passkey(out: Path, specs: dict[str, ModelSpec], lengths: Any) -> str:
    """Passkey retrieval: the base model at its own context first; the longer lengths for
    all three models only if that works. Returns a sentence (and table) for the report."""
    from transformers import AutoTokenizer

    shortest = pk.min_length(AutoTokenizer.from_pretrained(specs["base"].path))
    if shortest > lengths.base:
        return (
            f"Passkey retrieval: not run. The paper's passkey prompt needs at least {shortest} "
            f"tokens with this tokenizer, more than the base model's {lengths.base}-token "
            "context, so the base model cannot be tested at its own length (the condition "
            "for testing the longer ones). Perplexity is the test here."
        )
    first = run_passkey(
        load_models([specs["base"]], dtype="float32", device="cpu"),
        lengths=[lengths.base],
        depths=PASSKEY_DEPTHS,
        trials=PASSKEY_TRIALS,
    )
    rows = first["results"]
    accuracy = sum(r["correct"] for r in rows) / sum(r["trials"] for r in rows)
    if accuracy < PASSKEY_USABLE:
        save(first, out, echo=None)
        return (
            f"Passkey retrieval: the base model retrieves {accuracy:.0%} of passkeys at its own "
            f"{lengths.base}-token context ({len(rows) * PASSKEY_TRIALS} trials), so a model this "
            "small, pre-trained on novels only, cannot do the task at all; passkey retrieval at "
            "longer contexts would measure nothing and is not run. Perplexity is the test here."
        )
    full = run_passkey(
        load_models(list(specs.values()), dtype="float32", device="cpu"),
        lengths=lengths.eval_lengths,
        depths=PASSKEY_DEPTHS,
        trials=PASSKEY_TRIALS,
    )
    paths = save(full, out, echo=None)
    return "Passkey retrieval:\n\n" + paths["md"].read_text(encoding="utf-8")
