"""``longlora.shift: false`` (the paper's "short attention" ablation) through the real
dispatch: with one layer, the outputs of a group depend on no token of another group;
with the shift on (S2-Attn), the shifted heads carry information across the boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from longlora_plugin.config import LongLoRAConfig
from longlora_plugin.s2 import disable_s2_attn, enable_s2_attn

GROUP, LENGTH = 16, 64


def _outputs_change_after_first_group(model, shift: bool) -> torch.Tensor:
    """Per position after group 0: whether the last hidden state moves when the second
    half of group 0 changes."""
    enable_s2_attn(model, group_size=GROUP, shift=shift)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (1, LENGTH))
    changed = ids.clone()
    changed[0, GROUP // 2 : GROUP] = torch.randint(4, model.config.vocab_size, (GROUP // 2,))
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=changed, output_hidden_states=True).hidden_states[-1]
    disable_s2_attn(model)
    return (a - b).abs().amax(-1)[0, GROUP:] > 1e-6


def test_short_attention_keeps_groups_apart(tiny_model_factory):
    path: Path = tiny_model_factory("llama", num_hidden_layers=1, max_position_embeddings=LENGTH)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    short = _outputs_change_after_first_group(model, shift=False)
    shifted = _outputs_change_after_first_group(model, shift=True)
    assert short.numel() == LENGTH - GROUP
    assert not short.any()  # no token after group 0 sees it
    # S2: the shifted half's group [G/2, 3G/2) holds the changed half and the first half of
    # group 1, so positions G .. 3G/2 - 1 see the change, and only they
    assert shifted[: GROUP // 2].all() and not shifted[GROUP // 2 :].any()


def test_shift_false_needs_s2_and_no_context_parallelism():
    assert not LongLoRAConfig(shift=False).shift
    for bad in ({"s2_attn": False}, {"context_parallel": 2}):
        with pytest.raises(ValueError, match="longlora.shift=false needs"):
            LongLoRAConfig(shift=False, **bad)
