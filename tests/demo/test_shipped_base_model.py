"""The demo's shipped base model (``demo/base_model``): it is what ``python -m demo.pretrain``
builds from Austen, and it retrieves a passkey inside its context C0 and not at 4x C0 -
the precondition of the demo's verdict, checked on the evaluation's own keys (seed 0)."""

from __future__ import annotations

import json
import shutil

import pytest

from demo.evaluate import PASSKEY_DEPTHS
from demo.pretrain import CONTEXT, SHIPPED
from longlora_plugin.evaluation.models import RopeOverride
from tests.support.passkey import passkey_accuracy

DEPTHS = PASSKEY_DEPTHS  # the demo's grid: 5 depths x 10 keys, so the demo's figures


def _accuracy(length: int, rope: RopeOverride | None = None) -> float:
    return passkey_accuracy(SHIPPED, length, rope=rope, depths=DEPTHS)


def test_shipped_base_model_retrieves_inside_its_context_only():
    """`make demo` measured 0.90 at 256 and 0.02 at 1024 (45 and 1 of 50 keys, Axolotl
    0.19's torch); the bounds allow one key to flip under the other leg's libraries."""
    assert _accuracy(CONTEXT) >= 0.88
    assert _accuracy(4 * CONTEXT) <= 0.06


def test_yarn_alone_retrieves_at_4x_and_linear_alone_does_not():
    """Why the demo interpolates linearly (docs/demo.md): YaRN x4 without training keeps
    the fast RoPE dimensions the copy relies on and already retrieves at 1024 (0.72), so
    criterion 3 could not hold with it; linear x4 compresses them and the copy drifts
    (0.02 at 1024), which is what LongLoRA's training has to repair."""
    assert _accuracy(4 * CONTEXT, rope=RopeOverride("yarn", 4.0)) >= 0.6
    assert _accuracy(4 * CONTEXT, rope=RopeOverride("linear", 4.0)) <= 0.1


def test_shipped_base_model_is_small_and_documented():
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["command"] == "OMP_NUM_THREADS=2 python -m demo.pretrain"
    probes = [entry["passkey_at_C0"] for entry in recipe["log"]]
    assert len(probes) >= 2 and probes[0] == 0.0 and probes[-1] > 0.5  # it learned to copy
    weights = (SHIPPED / "model.safetensors").stat().st_size
    assert weights < 6_000_000, weights


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_shipped_base_model_matches_the_current_recipe():
    """Editing the recipe or the text without regenerating the model would make the demo
    pre-train for about half an hour instead of using the shipped file."""
    from demo.pretrain import fingerprint
    from demo.text import load_demo_text

    texts = list(load_demo_text(None, None).train.values())
    shipped = json.loads((SHIPPED / "recipe.json").read_text())["fingerprint"]
    assert shipped == fingerprint(texts), "regenerate: OMP_NUM_THREADS=2 python -m demo.pretrain"
