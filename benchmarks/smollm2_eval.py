"""Perplexity of SmolLM2-135M-Instruct on held-out *Emma*: base, interpolation only, LongLoRA.

Three models, each evaluated with the project's evaluation API (what ``longlora eval ppl``
runs: :func:`longlora_plugin.evaluation.runner.run_ppl`, window-mean convention, full
attention):

* ``base``           the converted model as is (RoPE for 8192 positions),
* ``interp-x2``      the same weights loaded with linear RoPE x2 (``--rope interp-x2=linear:2``),
  no training,
* ``longlora-16k``   the Axolotl output directory of ``example_configs/smollm2-135m-16k-cpu.yml``
  (LoRA adapter + trained embeddings/norms, config with linear x2).

At the longest length the per-token NLL of the scored window (from
:func:`longlora_plugin.evaluation.loss.token_nll`, recorded while ``run_ppl`` scores it, so
no second forward pass) is also split into position blocks of ``--block`` tokens.

Equivalent CLI for the table alone::

    longlora eval ppl --data ~/.cache/longlora_plugin/austen/emma.txt \\
      --model base=outputs/smollm2-135m-instruct \\
      --model interp-x2=outputs/smollm2-135m-instruct --rope interp-x2=linear:2 \\
      --model longlora-16k=outputs/smollm2-135m-16k-cpu \\
      --lengths 4096,8192,12288,16384 --convention window-mean --max-windows 1 \\
      --dtype float32 --device cpu --out outputs/smollm2-eval

Writes ``benchmarks/results/smollm2-135m-16k-cpu.json`` (everything, with wall times and
the training summary parsed from the training log), ``docs/img/smollm2-16k.png`` and
prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL_DIR = REPO / "outputs" / "smollm2-135m-instruct"
ADAPTER_DIR = REPO / "outputs" / "smollm2-135m-16k-cpu"
TRAIN_LOG = REPO / "outputs" / "smollm2-135m-16k-cpu.log"
RESULT = REPO / "benchmarks" / "results" / "smollm2-135m-16k-cpu.json"
PLOT = REPO / "docs" / "img" / "smollm2-16k.png"


@contextlib.contextmanager
def recording_nll(length: int, store: list):
    """Record the per-token NLL of every ``length``-token window that ``run_ppl`` scores
    (wraps the ``token_nll`` the perplexity module calls; restored on exit)."""
    from longlora_plugin.evaluation import perplexity

    original = perplexity.token_nll

    def wrapper(model, ids, targets, **kwargs):
        nll = original(model, ids, targets, **kwargs)
        if ids.shape[1] == length:
            store.append((nll.detach().double().cpu(), (targets != -100).cpu()))
        return nll

    perplexity.token_nll = wrapper
    try:
        yield store
    finally:
        perplexity.token_nll = original


def block_ppl(records: list, length: int, block: int) -> list[dict]:
    """Perplexity per position block over the recorded windows (all rows pooled)."""
    rows = []
    for start in range(0, length, block):
        total, count = 0.0, 0
        for nll, scored in records:
            part, mask = nll[:, start : start + block], scored[:, start : start + block]
            total += float(part[mask].sum())
            count += int(mask.sum())
        rows.append(
            {
                "positions": f"{start}-{start + block}",
                "ppl": math.exp(total / count) if count else None,
                "tokens": count,
            }
        )
    return rows


def training_summary(log: Path) -> dict:
    """Steps, losses and runtime from an ``axolotl train`` log (tqdm + HF Trainer dicts)."""
    if not log.is_file():
        return {}
    text = log.read_text(encoding="utf-8", errors="replace")
    losses = [float(m) for m in re.findall(r"'loss': '?([0-9.]+)'?", text)]
    summary: dict = {"log": str(log.relative_to(REPO)), "losses": losses}
    runtime = re.search(r"'train_runtime': '?([0-9.]+)'?", text)
    if runtime:
        summary["train_runtime_s"] = float(runtime.group(1))
    steps = re.findall(r"\| (\d+)/(\d+) \[", text)
    if steps:
        summary["steps_run"], summary["max_steps"] = int(steps[-1][0]), int(steps[-1][1])
    return summary


def model_specs(model_dir: Path = MODEL_DIR, adapter_dir: Path = ADAPTER_DIR) -> dict:
    """The page's three models by name: base, interpolation x2 only, LongLoRA 16k."""
    from longlora_plugin.evaluation.models import ModelSpec, RopeOverride

    return {
        "base": ModelSpec("base", str(model_dir)),
        "interp-x2": ModelSpec("interp-x2", str(model_dir), RopeOverride("linear", 2.0)),
        "longlora-16k": ModelSpec("longlora-16k", str(adapter_dir)),
    }


def plot(payload: dict, blocks: dict, path: Path) -> Path:
    from longlora_plugin.evaluation.report import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in [m["name"] for m in payload["models"]]:
        pts = sorted(
            (r["length"], r["ppl"]) for r in payload["results"] if r["model"] == name and r["ppl"]
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax1.plot(xs, ys, marker="o", label=name)
        if name in blocks:
            ys = [b["ppl"] for b in blocks[name]]
            ax2.plot(range(len(ys)), ys, marker="o", label=name)
            ax2.set_xticks(range(len(ys)), [b["positions"] for b in blocks[name]])
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    lengths = sorted({r["length"] for r in payload["results"]})
    original = payload["models"][0].get("original_length")
    if original and lengths[0] <= original <= lengths[-1]:
        ax1.axvline(original, color="grey", linestyle="--", linewidth=1, label="original length")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        low, high = ax.get_ylim()
        if high / low < 4:  # no decade tick inside: label the minor ticks instead
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        else:  # label 20, 30, 50, 200, 300, 500 only
            ax.yaxis.set_minor_formatter(
                FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else "")
            )
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_xticks(lengths, [str(n) for n in lengths])
    ax1.set_xlabel("context length (tokens), window-mean")
    ax1.set_title("Emma (held out): perplexity by context length")
    window = max(lengths)
    ax2.set_xlabel(f"token positions inside one {window}-token window")
    ax2.set_title(f"Emma, {window}-token window: perplexity by position")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from demo.corpora import austen_novels
    from longlora_plugin.evaluation import runner
    from longlora_plugin.evaluation.models import load_eval_model
    from longlora_plugin.evaluation.report import ppl_table
    from longlora_plugin.evaluation.texts import load_texts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192,12288,16384")
    parser.add_argument("--max-windows", type=int, default=1)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument(
        "--models", default="base,interp-x2,longlora-16k", help="subset, comma-separated"
    )
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--adapter-dir", type=Path, default=ADAPTER_DIR)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models' results already in --out (evaluate models in several runs)",
    )
    args = parser.parse_args(argv)

    import torch

    lengths = sorted(int(x) for x in args.lengths.split(","))
    longest = lengths[-1]
    emma = austen_novels()["emma"]
    docs = load_texts(str(emma))
    available = model_specs(args.model_dir, args.adapter_dir)
    specs = [available[name] for name in args.models.split(",")]

    payloads, blocks, wall = [], {}, {}
    for spec in specs:
        started = time.perf_counter()
        item = load_eval_model(spec, dtype="float32", device="cpu")
        records: list = []
        with recording_nll(longest, records):
            payload = runner.run_ppl(
                [item],
                docs,
                lengths=lengths,
                conventions=["window-mean"],
                max_windows=args.max_windows,
                data=str(emma),
                progress=False,
            )
        blocks[spec.name] = block_ppl(records, longest, args.block)
        wall[spec.name] = round(time.perf_counter() - started, 1)
        payloads.append(payload)
        row = {r["length"]: r["ppl"] for r in payload["results"]}
        print(
            f"{spec.name}: {row} blocks {[round(b['ppl'], 2) for b in blocks[spec.name]]} "
            f"({wall[spec.name]} s)",
            file=sys.stderr,
            flush=True,
        )
        del item
        runner.release()

    merged = dict(payloads[0])
    merged["models"] = [m for p in payloads for m in p["models"]]
    merged["results"] = [r for p in payloads for r in p["results"]]
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text(encoding="utf-8"))
        done = {spec.name for spec in specs}
        keep = [m for m in old["perplexity"]["models"] if m["name"] not in done]
        merged["models"] = keep + merged["models"]
        merged["results"] = [
            r for r in old["perplexity"]["results"] if r["model"] not in done
        ] + merged["results"]
        blocks = {
            **{k: v for k, v in old["position_blocks"]["models"].items() if k not in done},
            **blocks,
        }
        wall = {**{k: v for k, v in old["eval_wall_s"].items() if k not in done}, **wall}
        order = [n for n in available if n in blocks]
        merged["models"].sort(key=lambda m: order.index(m["name"]))
        blocks = {n: blocks[n] for n in order}
    result = {
        "benchmark": "SmolLM2-135M-Instruct 8k -> 16k, LongLoRA on CPU, held-out Emma",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "perplexity": merged,
        "position_blocks": {"window_length": longest, "block": args.block, "models": blocks},
        "eval_wall_s": wall,
        "training": training_summary(TRAIN_LOG),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(merged, blocks, args.plot)
    print(ppl_table(merged))
    header = "| model | " + " | ".join(b["positions"] for b in next(iter(blocks.values()))) + " |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for name, rows in blocks.items():
        print(f"| {name} | " + " | ".join(f"{b['ppl']:.2f}" for b in rows) + " |")
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
