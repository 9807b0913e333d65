"""Outputs of an evaluation: JSON, markdown tables and PNG plots (matplotlib, Agg).

The payloads are the dicts built by :mod:`longlora_plugin.evaluation.runner`:

* perplexity: ``{"evaluation": "perplexity", "conventions": {name: description},
  "settings": {...}, "models": [model info], "results": [{"model", "convention",
  "length", "ppl", ...}]}``;
* passkey: ``{"evaluation": "passkey", "settings": {...}, "models": [...],
  "results": [{"model", "length", "depth", "correct", "trials", "accuracy"}],
  "trials": [per-trial records]}``;
* RULER: ``{"evaluation": "ruler", "settings": {...}, "models": [...], "results":
  [{"model", "task", "length", "score", "samples", "haystacks", "prefill_tokens_per_s",
  "prompt_tokens_per_s", "prefill_seconds", "decode_seconds", "build_seconds",
  "seconds"}],
  "summary": {model: averages, effective lengths, regression line}, "samples": [...]}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN/inf are not produced: missing = null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if value < 1e4 else f"{value:.3g}"


def _models(payload: dict[str, Any]) -> list[str]:
    return [m["name"] for m in payload["models"]]


def ppl_table(payload: dict[str, Any]) -> str:
    """One markdown table per convention: rows = models, columns = lengths, plus the
    model's mean tokens/s; the convention's definition as the caption."""
    results = payload["results"]
    lengths = sorted({r["length"] for r in results})
    blocks = []
    for convention, description in payload["conventions"].items():
        rows = [r for r in results if r["convention"] == convention]
        if not rows:
            continue
        lines = [
            f"Perplexity, {convention} convention ({description})",
            "",
            "| model | " + " | ".join(str(n) for n in lengths) + " | tokens/s |",
            "|---|" + "---:|" * (len(lengths) + 1),
        ]
        for name in _models(payload):
            mine = {r["length"]: r for r in rows if r["model"] == name}
            if not mine:
                continue
            cells = [_fmt(mine[n]["ppl"]) if n in mine else "-" for n in lengths]
            tokens = sum(r["input_tokens"] for r in mine.values())
            seconds = sum(r["seconds"] for r in mine.values())
            speed = f"{tokens / seconds:,.0f}" if seconds > 0 else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def passkey_table(payload: dict[str, Any]) -> str:
    """Markdown table: rows = (model, length), columns = depths, plus the row mean;
    cells are accuracies (fraction of exact matches)."""
    results = payload["results"]
    depths = sorted({r["depth"] for r in results})
    lengths = sorted({r["length"] for r in results})
    trials = payload["settings"].get("trials")
    lines = [
        f"Passkey retrieval accuracy (exact match, {trials} trials per cell, greedy)",
        "",
        "| model | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
        "|---|---:|" + "---:|" * (len(depths) + 1),
    ]
    for name in _models(payload):
        for length in lengths:
            cells = {r["depth"]: r for r in results if r["model"] == name and r["length"] == length}
            if not cells:
                continue
            accs = [cells[d]["accuracy"] for d in depths if d in cells]
            mean = sum(accs) / len(accs)
            row = [_fmt(cells[d]["accuracy"], 2) if d in cells else "-" for d in depths]
            lines.append(f"| {name} | {length} | " + " | ".join(row) + f" | {_fmt(mean, 2)} |")
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _reference_lines(ax: Any, payload: dict[str, Any], colors: dict[str, Any]) -> None:
    originals = sorted(
        {m["original_length"] for m in payload["models"] if m.get("original_length")}
    )
    for i, length in enumerate(originals):
        ax.axvline(
            length,
            color="grey",
            linestyle="--",
            linewidth=1,
            label="original length" if i == 0 else None,
        )
    by_length: dict[int, list[str]] = {}
    for model in payload["models"]:
        if model.get("trained_length"):
            by_length.setdefault(model["trained_length"], []).append(model["name"])
    for length, names in by_length.items():
        ax.axvline(
            length,
            color=colors.get(names[0], "black") if len(names) == 1 else "black",
            linestyle=":",
            linewidth=1.5,
            label=f"trained length ({', '.join(names)})",
        )


def plot_ppl(payload: dict[str, Any], path: Path) -> Path:
    """Perplexity vs context length, one panel per convention, one line per model; the
    original length (dashed grey) and each model's trained length (dotted) marked."""
    plt = pyplot()
    conventions = [
        c for c in payload["conventions"] if any(r["convention"] == c for r in payload["results"])
    ]
    fig, axes = plt.subplots(
        1, len(conventions), figsize=(6 * len(conventions), 4.5), squeeze=False
    )
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(_models(payload))}
    for ax, convention in zip(axes[0], conventions, strict=True):
        for name in _models(payload):
            rows = sorted(
                (
                    r
                    for r in payload["results"]
                    if r["model"] == name and r["convention"] == convention
                ),
                key=lambda r: r["length"],
            )
            points = [(r["length"], r["ppl"]) for r in rows if r["ppl"] is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=colors[name], label=name)
        _reference_lines(ax, payload, colors)
        ax.set_xscale("log", base=2)
        lengths = sorted({r["length"] for r in payload["results"]})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("evaluation context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"Perplexity ({convention})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Heatmap:
    """The layout shared by the retrieval heatmaps: one panel per model."""

    rows: list[str]
    columns: list[str]
    xlabel: str
    ylabel: str
    vmax: float
    cell: str  # format of a cell's value
    colorbar: str
    origin: str = "upper"


def _heatmaps(spec: Heatmap, panels: list[tuple[str, list[list[float]]]], path: Path) -> Path:
    """Draw ``(title, grid)`` panels side by side (cells annotated) into ``path``."""
    plt = pyplot()
    rows, columns = spec.rows, spec.columns
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(2 + (1.3 + 0.8 * len(columns)) * len(panels), 1.6 + 0.4 * len(rows)),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for ax, (title, grid) in zip(axes[0], panels, strict=True):
        image = ax.imshow(
            grid, vmin=0, vmax=spec.vmax, cmap="RdYlGn", aspect="auto", origin=spec.origin
        )
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    text = format(value, spec.cell)
                    ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(columns)), columns)
        first = ax is axes[0][0]
        ax.set_yticks(range(len(rows)), rows if first else [""] * len(rows))
        ax.set_xlabel(spec.xlabel)
        if first:
            ax.set_ylabel(spec.ylabel)
        ax.set_title(title, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=spec.colorbar)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(payload: dict[str, Any], path: Path) -> Path:
    """One length x depth accuracy heatmap per model (cells annotated)."""
    depths = sorted({r["depth"] for r in payload["results"]})
    lengths = sorted({r["length"] for r in payload["results"]})
    info = {m["name"]: m for m in payload["models"]}
    panels = []
    for name in _models(payload):
        grid = [[math.nan] * len(depths) for _ in lengths]
        for r in payload["results"]:
            if r["model"] == name:
                grid[lengths.index(r["length"])][depths.index(r["depth"])] = r["accuracy"]
        lengths_note = ", ".join(
            f"{label} {info[name][key]}"
            for key, label in (("original_length", "original"), ("trained_length", "trained"))
            if info.get(name, {}).get(key)
        )
        panels.append((f"{name}\n{lengths_note}" if lengths_note else name, grid))
    spec = Heatmap(
        rows=[str(n) for n in lengths],
        columns=[f"{d:g}" for d in depths],
        xlabel="depth of the key",
        ylabel="prompt length (tokens)",
        vmax=1,
        cell=".2f",
        colorbar="accuracy",
        origin="lower",
    )
    return _heatmaps(spec, panels, path)


def ruler_table(payload: dict[str, Any]) -> str:
    """Markdown: rows = (model, task) plus each model's average, columns = lengths
    (scores in percent); then each model's effective lengths and the regression line."""
    results, summary = payload["results"], payload["summary"]
    settings = payload["settings"]
    lengths = sorted({r["length"] for r in results})
    counts = sorted({r["samples"] for r in results})
    samples = "-".join(str(n) for n in {counts[0]: 0, counts[-1]: 0}) if counts else "0"
    lines = [
        f"RULER score (string_match_all, %, {samples} samples per cell, greedy)",
        "",
        "| model | task | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|---|" + "---:|" * len(lengths),
    ]
    for name in _models(payload):
        for task in settings["tasks"]:
            cells = {r["length"]: r for r in results if r["model"] == name and r["task"] == task}
            if cells:
                row = [_fmt(cells[n]["score"], 1) if n in cells else "-" for n in lengths]
                lines.append(f"| {name} | {task} | " + " | ".join(row) + " |")
        average = summary[name]["average"]
        row = [_fmt(average.get(n), 1) if n in average else "-" for n in lengths]
        lines.append(f"| **{name}** | **average** | " + " | ".join(row) + " |")
    lines += ["", "Effective length (every length up to it averages >= the threshold):", ""]
    for name in _models(payload):
        s = summary[name]
        line = f"- {name}: {s['effective_length'] or 'none'} at {settings['threshold']:g} (RULER)"
        if s["relative_threshold"] is not None:
            line += (
                f"; {s['relative_effective_length'] or 'none'} at "
                f"{s['relative_threshold']:.1f} = {settings['relative']:g} x its own "
                f"{s['score_at_original']:.1f} at {s['original_length_tested']}"
            )
        elif s["score_at_original"] == 0:
            line += (
                f"; relative rule: does not apply (it averages 0 at its original "
                f"{s['original_length_tested']})"
            )
        else:
            line += "; relative rule: no length within its original context tested"
        lines.append(line)
    lines += ["", "Regression line (average at the model's original context):", ""]
    rows = [name for name in _models(payload) if summary[name]["score_at_original"] is not None]
    for name in rows:
        s = summary[name]
        base = s["base_score_at_original"]
        versus = f" (base model: {base:.1f})" if base is not None else ""
        lines.append(
            f"- {name}: {s['score_at_original']:.1f} at {s['original_length_tested']}{versus}"
        )
    if not rows:
        lines.append("- no length within the models' original contexts tested")
    return "\n".join(lines + ruler_cost(payload)) + "\n"


def ruler_cost(payload: dict[str, Any]) -> list[str]:
    """Markdown lines: per model and length, the prefill's speed (tokens run through
    the model per second, and prompt tokens answered per second, which is higher when
    haystack prefills are reused) and where the time went."""
    lines = [
        "",
        "Cost (all tasks of a length; prefill = forward passes over prompts, decode = greedy "
        "tokens, build = generating and tokenizing the samples):",
        "",
        "| model | length | samples | prefill tok/s | prompt tok/s | prefill s | decode s "
        "| build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _models(payload):
        for length in sorted({r["length"] for r in payload["results"]}):
            rows = [r for r in payload["results"] if r["model"] == name and r["length"] == length]
            if not rows:
                continue
            prefill = sum(r["prefill_seconds"] for r in rows)
            computed = sum(r["prefill_tokens_per_s"] * r["prefill_seconds"] for r in rows)
            prompts = sum(r["prompt_tokens_per_s"] * r["prefill_seconds"] for r in rows)
            cells = [
                str(sum(r["samples"] for r in rows)),
                f"{computed / prefill:,.0f}",
                f"{prompts / prefill:,.0f}",
                f"{prefill:.1f}",
                f"{sum(r['decode_seconds'] for r in rows):.1f}",
                f"{sum(r['build_seconds'] for r in rows):.1f}",
            ]
            lines.append(f"| {name} | {length} | " + " | ".join(cells) + " |")
    return lines


def plot_ruler(payload: dict[str, Any], path: Path) -> Path:
    """One task x length heatmap of scores per model, the average as the last row."""
    tasks = [*payload["settings"]["tasks"], "average"]
    lengths = sorted({r["length"] for r in payload["results"]})
    panels = []
    for name in _models(payload):
        grid = [[math.nan] * len(lengths) for _ in tasks]
        for r in payload["results"]:
            if r["model"] == name:
                grid[tasks.index(r["task"])][lengths.index(r["length"])] = r["score"]
        for length, score in payload["summary"][name]["average"].items():
            grid[-1][lengths.index(int(length))] = score
        effective = payload["summary"][name]["effective_length"]
        panels.append((f"{name}\neffective length {effective or 'none'}", grid))
    spec = Heatmap(
        rows=tasks,
        columns=[str(n) for n in lengths],
        xlabel="length (tokens)",
        ylabel="task",
        vmax=100,
        cell=".0f",
        colorbar="score (%)",
    )
    return _heatmaps(spec, panels, path)
