"""The CI effect test's statistics (``demo/effect.py``) against an independent computation,
and its command line."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.effect import FAR, LENGTH, TRIALS, far_answer_nll, main
from demo.pretrain import SHIPPED
from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation.models import ModelSpec


def test_answer_nll_is_the_mean_cross_entropy_of_the_key_tokens():
    """Plain logits and cross-entropy over the same prompts and keys give the same mean."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    losses = []
    for depth in FAR:
        for trial in range(TRIALS):
            key = pk.trial_passkey(0, LENGTH, depth, trial)
            prompt = pk.build_prompt(tokenizer, LENGTH, depth, key).input_ids
            answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            picked = logits[len(prompt) - 1 : -1].log_softmax(-1)
            losses += (-picked[torch.arange(len(answer)), torch.tensor(answer)]).tolist()
    assert len(losses) > 2 * TRIALS  # more than one token per answer
    expected = sum(losses) / len(losses)
    got = far_answer_nll(ModelSpec("base", str(SHIPPED)))
    assert abs(got - expected) < 1e-4, (got, expected)


def test_command_line_writes_both_statistics(tmp_path, capsys):
    out = tmp_path / "effect.json"
    main(["--model", f"base={SHIPPED}", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["length"] == LENGTH and payload["depths"] == list(FAR)
    [row] = payload["rows"]
    assert row["model"] == "base" and 0.0 <= row["exact_match"] <= 0.2
    assert row["answer_nll"] > 1.5  # the base model does not know keys beyond its context
    assert "base: exact match" in capsys.readouterr().out
