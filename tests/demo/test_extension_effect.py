"""The effect in CI: the shipped base model (C0 = 256), extended 4x by ``axolotl train``
with the plugins on the demo's own recipe (``example_configs/quickstart-cpu.yml``, 250 of
its 800 steps), knows the passkeys at 2x C0 whose key lies more than C0 tokens before the
question - where neither the base model nor the interpolation without training does.

The run is the demo's: the same mix (Austen's novels and retrieval documents, answers
labelled), S2-Attn (G = 512), LoRA + embeddings and norms, linear RoPE interpolation, the
demo's answer-weighted loss; only the steps differ. It is evaluated with full attention on
the demo's passkey keys (the evaluation's seed, never trained on), at 2x C0 because a
model trained with S2-Attn retrieves up to about G with full attention, not to the trained
length (docs/demo.md).

What is asserted, and why (docs/demo.md, "The effect in CI", has the figures): the
answer's likelihood, and exact match only against the base model. At 250 steps the exact
match at the far depths spreads from 0.20 to 0.95 over six seeds of the same run
(``benchmarks/results/effect_spread.json``, 2026-12-07), and the CI run of 2026-12-07 gave
0.40 on one leg where a bound of 0.6 had been set from two runs: the run re-learns the
copy that linear interpolation breaks, and 250 steps leave it half learned in some runs.
The answer's mean negative log-likelihood separates every run from the untrained models:
0.04-0.73 nats per token for the six seeds, 2.07 for the base model, 2.48 for linear x4
alone. With a leak in the S2 kernel (non-causal groups, a temporary edit) the run scores
1.49 and exact match 0.00, so the test fails. Without interpolation the run retrieves
as well (250 steps teach the small model positions 256-1023 directly: exact match 0.85,
answer NLL 0.08), so the test also scores the adapter with the base model's RoPE put back
(``demo.effect.with_pretrained_rope``): a run that learned the interpolated positions
loses the keys there (2.53-3.53 nats per token for the six seeds), a run without
interpolation is unchanged (0.08), and the test asserts >= 1.5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from demo.effect import FAR, far_accuracy, far_answer_nll, with_pretrained_rope
from demo.effect import LENGTH as EVAL
from demo.pipeline import DOC_WORDS, LONGLORA_CONFIG, RETRIEVAL_SHARE
from demo.pretrain import CONTEXT, SHIPPED
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride
from longlora_plugin.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
TARGET = 4 * CONTEXT  # the demo's extension
STEPS = 250

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None, reason="the demo's text comes from Debian's apt-get"
)


def _far(model: Path, rope: RopeOverride | None = None) -> float:
    torch.set_num_threads(1)  # two pytest workers share the 2-core machine
    return far_accuracy(ModelSpec("m", str(model), rope), EVAL, FAR)


def _far_nll(model: Path, rope: RopeOverride | None = None) -> float:
    torch.set_num_threads(1)
    return far_answer_nll(ModelSpec("m", str(model), rope), EVAL, FAR)


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> tuple[Path, str]:
    """The shipped base model extended to :data:`TARGET` by ``axolotl train``; returns the
    adapter's directory and the run's output."""
    from transformers import AutoTokenizer

    from demo.retrieval_docs import write_mix
    from demo.text import load_demo_text, write_training_jsonl

    out = tmp_path_factory.mktemp("extend")
    novels = out / "novels.jsonl"
    write_training_jsonl(load_demo_text(None, None).train.values(), novels, DOC_WORDS)
    retrieval = out / "retrieval.jsonl"
    write_mix(novels, AutoTokenizer.from_pretrained(SHIPPED), TARGET, RETRIEVAL_SHARE, retrieval)

    cfg = yaml.safe_load((REPO / LONGLORA_CONFIG).read_text())
    assert cfg["sequence_len"] == TARGET
    assert [d["path"] for d in cfg["datasets"]] == [
        "./outputs/demo/novels.jsonl",
        "./outputs/demo/retrieval.jsonl",
    ]
    cfg["datasets"][0]["path"], cfg["datasets"][1]["path"] = str(novels), str(retrieval)
    cfg.update(
        base_model=str(SHIPPED),
        max_steps=STEPS,
        output_dir=str(out / "longlora"),
        dataset_prepared_path=str(out / "prepared"),
    )
    config = out / "extend.yml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # one thread: `make test` runs two pytest workers on the 2-core machine
    env = {**os.environ, **OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(config)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return out / "longlora", log


def test_the_run_is_the_demos_recipe(extended):
    _, log = extended
    assert "longlora: S2-Attn on 8 attention layers, group size 512, shift 256" in log
    assert "longlora: RoPE linear factor 4.0 (original 256, target 1024)" in log
    assert "demo: answer-weighted loss" in log


def test_extension_knows_the_keys_beyond_c0_where_the_base_model_and_interpolation_do_not(
    extended, tmp_path
):
    """Bounds sit between the measured figures (module docstring): the extended model's
    answer NLL at most 1.0 nats per token and at most half the base model's, the base
    model's, the untrained interpolation's and the extended model's with the base model's
    RoPE at least 1.5; exact match of the extended model no lower than the base model's,
    which itself stays at most 0.2."""
    adapter, _ = extended
    base, interpolation = _far_nll(SHIPPED), _far_nll(SHIPPED, RopeOverride("linear", 4.0))
    extension = _far_nll(adapter)
    pretrained_rope = _far_nll(with_pretrained_rope(adapter, tmp_path / "pretrained-rope"))
    found, base_found = _far(adapter), _far(SHIPPED)
    print(
        f"far depths at {EVAL}: answer NLL {extension:.3f} (base {base:.3f}, linear x4 "
        f"alone {interpolation:.3f}, the run with the base model's RoPE "
        f"{pretrained_rope:.3f}); exact match {found:.2f} (base {base_found:.2f})"
    )
    assert base >= 1.5 and interpolation >= 1.5
    assert extension <= min(1.0, 0.5 * base)
    assert pretrained_rope >= 1.5  # the run learned the interpolated positions
    assert base_found <= 0.2
    assert _far(SHIPPED, RopeOverride("linear", 4.0)) <= 0.2
    assert found >= base_found
