"""The CI effect test's statistics (``demo/effect.py``) against an independent computation,
and its command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from demo.effect import FAR, LENGTH, TRIALS, far_answer_nll, main, with_pretrained_rope
from demo.pretrain import CONTEXT, SHIPPED
from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation.models import ModelSpec, RopeOverride
from longlora_plugin.rope import resolve_rope


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


@pytest.fixture(scope="module")
def identity_adapter(tmp_path_factory):
    """A real PEFT LoRA adapter on the shipped base model, saved as Axolotl saves a run
    (the run's ``config.json`` beside it, here with linear x4): LoRA's B starts at zero, so
    the adapted model is the base model with the run's RoPE."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("adapter") / "run"
    base = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    config = AutoConfig.from_pretrained(SHIPPED)
    rope = resolve_rope(config, rope_type="linear", factor=4.0, sequence_len=4 * CONTEXT)
    for key, value in rope.config_overrides.items():
        setattr(config, key, value)
    config.save_pretrained(out)
    return out


def test_with_pretrained_rope_gives_the_adapter_the_base_models_positions(
    identity_adapter, tmp_path
):
    """The copy scores as the base model, the run's own directory as the base model with
    linear x4; the adapter's weights travel unchanged."""
    copy = with_pretrained_rope(identity_adapter, tmp_path / "copy")
    assert (copy / "adapter_model.safetensors").read_bytes() == (
        identity_adapter / "adapter_model.safetensors"
    ).read_bytes()
    saved = json.loads((copy / "config.json").read_text())
    pretrained = json.loads((SHIPPED / "config.json").read_text())
    assert saved["rope_parameters"] == pretrained["rope_parameters"]
    assert saved["max_position_embeddings"] == CONTEXT
    run = json.loads((identity_adapter / "config.json").read_text())
    assert run["rope_parameters"]["factor"] == 4.0  # the original is left as it was
    base = far_answer_nll(ModelSpec("base", str(SHIPPED)))
    interpolated = far_answer_nll(ModelSpec("linear4", str(SHIPPED), RopeOverride("linear", 4.0)))
    assert abs(base - interpolated) > 0.1  # the two RoPEs score apart here
    assert math.isclose(far_answer_nll(ModelSpec("copy", str(copy))), base, abs_tol=1e-4)
    assert math.isclose(
        far_answer_nll(ModelSpec("run", str(identity_adapter))), interpolated, abs_tol=1e-4
    )


def test_command_line_writes_both_statistics(identity_adapter, tmp_path, capsys):
    out = tmp_path / "effect.json"
    main(["--model", f"base={SHIPPED}", "--model", f"run={identity_adapter}", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["length"] == LENGTH and payload["depths"] == list(FAR)
    base, run = payload["rows"]
    assert base["model"] == "base" and 0.0 <= base["exact_match"] <= 0.2
    assert base["answer_nll"] > 1.5  # the base model does not know keys beyond its context
    assert "answer_nll_pretrained_rope" not in base  # a model directory, not an adapter
    # the identity adapter with its RoPE taken back is the base model
    assert math.isclose(run["answer_nll_pretrained_rope"], base["answer_nll"], abs_tol=1e-3)
    printed = capsys.readouterr().out
    assert "base: exact match" in printed and "with the base model's RoPE" in printed
