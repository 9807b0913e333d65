"""Evaluation step of the CPU demo: three models, full attention.

The models are the base model as pre-trained (``base``), the same weights with the RoPE
interpolation LongLoRA trains with and no training (``interpolation``), and the LongLoRA
adapter (``longlora``). Passkey retrieval over lengths (every multiple of C0 up to the
target) x depths, RULER's niah tasks whose shortest sample fits C0, and perplexity with the
paper's window-mean convention on the held-out text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longlora_plugin.evaluation import perplexity as pp
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride
from longlora_plugin.evaluation.runner import load_models, run_passkey, run_ppl, save
from longlora_plugin.evaluation.texts import load_texts

RULER_SAMPLES = 4
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


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
    out: Path, heldout: Path, lengths: Any, *, rope_type: str, max_windows: int, trials: int
) -> dict[str, Any]:
    """Passkey, RULER niah and perplexity of the three models; writes ``passkey.*``,
    ``ruler.*`` and ``ppl.*`` into ``out``. Returns ``{"accuracy": {key: {length: {depth:
    acc}}}, "ppl": {key: {length: ppl}}, "passkey", "ruler", "table": markdown, "plots"}``."""
    specs = demo_models(out, lengths.factor, rope_type)
    names = {spec.name: key for key, spec in specs.items()}
    models = list(specs.values())
    found = run_passkey(
        load_models(models, dtype="float32", device="cpu"),
        lengths=lengths.passkey_lengths,
        depths=PASSKEY_DEPTHS,
        trials=trials,
    )
    passkey_paths = save(found, out, echo=None)
    accuracy: dict[str, dict[int, dict[float, float]]] = {key: {} for key in specs}
    for row in found["results"]:
        accuracy[names[row["model"]]].setdefault(row["length"], {})[row["depth"]] = row["accuracy"]
    ruler_text = _ruler(specs, lengths)
    payload = run_ppl(
        load_models(models, dtype="float32", device="cpu"),
        load_texts(str(heldout)),
        lengths=lengths.eval_lengths,
        conventions=(pp.WINDOW_MEAN,),
        max_windows=max_windows,
        batch_size=8,
        data=str(heldout),
    )
    ppl_paths = save(payload, out, echo=None)
    ppl: dict[str, dict[int, float]] = {key: {} for key in specs}
    for row in payload["results"]:
        ppl[names[row["model"]]][row["length"]] = row["ppl"]
    return {
        "accuracy": accuracy,
        "ppl": ppl,
        "passkey": "Passkey retrieval (the paper's prompt; keys of seed 0, never trained on):\n\n"
        + heatmap_text(accuracy, specs)
        + "\n\n"
        + passkey_paths["md"].read_text(encoding="utf-8"),
        "ruler": ruler_text,
        "table": _table(ppl, specs, lengths, payload),
        "plots": f"{passkey_paths['png']}, {ppl_paths['png']}",
    }


def heatmap_text(accuracy: dict[str, dict[int, dict[float, float]]], specs) -> str:
    """The passkey heatmap as text, one block per model: rows are lengths (longest on
    top), columns depths, cells the accuracy in tenths (``#`` = 10/10, ``.`` = 0)."""
    blocks = []
    for key, rows in accuracy.items():
        if not rows:
            continue
        depths = sorted(next(iter(rows.values())))
        lines = [f"{specs[key].name}", "  length | " + " ".join(f"{d:>4g}" for d in depths)]
        for length in sorted(rows, reverse=True):
            cells = [rows[length][d] for d in depths]
            lines.append(
                f"  {length:>6} | "
                + " ".join(
                    f"{'#' if a >= 1 else ('.' if a == 0 else round(10 * a)):>4}" for a in cells
                )
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n  (depth = where the key line sits; # = every key found)"


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
    """RULER (``longlora eval ruler``) on the niah tasks without an essay haystack whose
    shortest sample fits the base model's context, at the passkey lengths, for the three
    models; or the sentence saying that none fits."""
    from transformers import AutoTokenizer

    from longlora_plugin.evaluation import ruler, ruler_eval, ruler_tasks
    from longlora_plugin.evaluation.report import ruler_table

    tokenizer = AutoTokenizer.from_pretrained(specs["base"].path)
    offline = [
        name
        for name, task in ruler_tasks.TASKS.items()
        if task.kind == "niah" and task.haystack != "essay"
    ]
    limit = max(lengths.passkey_lengths)
    shortest = {name: ruler.shortest_length(name, tokenizer, limit=limit) for name in offline}
    fitting = [name for name, n in shortest.items() if n is not None and n <= lengths.base]
    needed = ", ".join(f"{name} {n or f'> {limit}'}" for name, n in shortest.items())
    if not fitting:
        return (
            f"RULER: not run. Its shortest niah samples with this tokenizer ({needed} tokens, "
            "prompt plus answer budget) do not fit the base model's "
            f"{lengths.base}-token context, so no task can be scored at its own length."
        )
    payload = ruler_eval.run(
        load_models(list(specs.values()), dtype="float32", device="cpu"),
        lengths=lengths.passkey_lengths,
        tasks=fitting,
        samples=samples,
        progress=True,
    )
    return (
        f"RULER niah ({samples} samples per cell; the base model was trained on "
        "niah_single_1-style documents only):\n\n" + ruler_table(payload)
    )
