"""The tiny retrieval models the evaluation tests score, shipped as files: trained once by
this module's recipes instead of in every test session (~95 s of CPU per test leg).

* ``niah``: a 3-layer Llama trained on RULER ``niah_single_1`` prompts (seeds
  ``train/<i>``, 175-195 tokens) to answer the needle's value
  (``tests/evaluation/test_ruler.py``).
* ``copier``: a 2-layer Llama trained on passkey prompts (``evaluation/passkey.py``) to
  copy the key (``tests/evaluation/test_evaluation.py``).

Each lives in ``tests/fixtures/retrievers/<name>/`` (``save_pretrained`` weights and
tokenizer, fp32) with ``recipe.json``: the recipe, the training log (the loss every 50
steps), the library versions and a fingerprint of the prompts the tests build. The
untrained twin is not shipped: it is the same architecture at the recipe's seed, built
on load (:func:`tests.support.copy_task.untrained_twin`).

Regenerate both (about 2 minutes on one core) after changing a prompt builder::

    OMP_NUM_THREADS=1 python -m tests.support.retrievers

:func:`load` refuses a shipped model whose fingerprint no longer matches the prompts the
current code builds, naming that command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.support.copy_task import (
    NiahData,
    PasskeyData,
    niah_tokenizer,
    passkey_tokenizer,
    train_copier,
    untrained_twin,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "retrievers"
COMMAND = "OMP_NUM_THREADS=1 python -m tests.support.retrievers"


def _niah_data(tok) -> NiahData:
    return NiahData(tok, range(175, 196, 5))


def _niah_fingerprint(tok) -> list[list[int]]:
    from longlora_plugin.evaluation import ruler

    return [
        ruler.build_sample("niah_single_1", tok, length, "fingerprint").input_ids
        for length in (190, 195)
    ]


def _passkey_data(tok) -> PasskeyData:
    from longlora_plugin.evaluation import passkey as pk

    shortest = pk.min_length(tok)
    return PasskeyData(tok, [shortest + 10 * i for i in range(5)], [i / 10 for i in range(11)])


def _passkey_fingerprint(tok) -> list[list[int]]:
    from longlora_plugin.evaluation import passkey as pk

    shortest = pk.min_length(tok)
    return [pk.build_prompt(tok, shortest + 30, depth, "12345").input_ids for depth in (0, 1)]


@dataclass(frozen=True)
class Recipe:
    """How one retriever is trained (:func:`train_copier` arguments) and what identifies
    the prompts it was trained for."""

    tokenizer: Callable[[], Any]
    data: Callable[[Any], Any]
    fingerprint: Callable[[Any], list[list[int]]]
    steps: int
    lr: float
    layers: int


RECIPES: dict[str, Recipe] = {
    # batch 32, one-cycle lr 1e-3: 100 and 90 at 190 and 195 tokens (700 steps: 100 and 70)
    "niah": Recipe(niah_tokenizer, _niah_data, _niah_fingerprint, steps=1000, lr=1e-3, layers=3),
    # batch 32, one-cycle lr 5e-3: accuracy 1.0 on the test's lengths and depths
    "copier": Recipe(
        passkey_tokenizer, _passkey_data, _passkey_fingerprint, steps=400, lr=5e-3, layers=2
    ),
}


def _digest(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def train(name: str, out: Path = FIXTURES, steps: int | None = None) -> Path:
    """Train ``name``'s recipe (``steps`` overrides its step count) and save the model, its
    tokenizer and ``recipe.json`` in ``out / name``."""
    recipe = RECIPES[name]
    steps = steps or recipe.steps
    torch.set_num_threads(1)
    started = time.time()
    tok = recipe.tokenizer()
    losses: list[float] = []
    model, _ = train_copier(
        tok,
        recipe.data(tok).sample,
        steps=steps,
        lr=recipe.lr,
        layers=recipe.layers,
        losses=losses,
    )
    target = out / name
    model.save_pretrained(target)
    tok.save_pretrained(target)
    log = {
        "command": COMMAND,
        "recipe": {"steps": steps, "lr": recipe.lr, "layers": recipe.layers},
        "seconds": round(time.time() - started, 1),
        "loss_every_50_steps": [round(v, 4) for v in losses[::50]] + [round(losses[-1], 4)],
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers")},
        "python": sys.version.split()[0],
        "fingerprint": _digest(recipe.fingerprint(tok)),
    }
    (target / "recipe.json").write_text(json.dumps(log, indent=2) + "\n")
    return target


def load(name: str):
    """``(trained, untrained, tokenizer)`` of the shipped ``name``; raises if the prompts
    the current code builds are not those it was trained for."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = FIXTURES / name
    tok = AutoTokenizer.from_pretrained(path)
    shipped = json.loads((path / "recipe.json").read_text())["fingerprint"]
    now = _digest(RECIPES[name].fingerprint(tok))
    if now != shipped:
        raise AssertionError(
            f"tests/fixtures/retrievers/{name} was trained on other prompts than the current "
            f"code builds (fingerprint {shipped}, now {now}): regenerate it with `{COMMAND}`"
        )
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, untrained_twin(model.config), tok


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else list(RECIPES)
    random.seed(0)
    for name in names:
        target = train(name)
        print(f"{target}: {json.loads((target / 'recipe.json').read_text())['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
