"""S2-Attn through transformers' real dispatch, for every backend it wraps.

Each case runs what a training run does: build a model with the backend,
``enable_s2_attn`` (transformers' ``set_attn_implementation`` with the S2 name), a
training forward + backward against the dense reference, an eval forward that must equal
the plain model bit for bit, ``generate`` with S2 on (eval) and after
``disable_s2_attn``, on a PEFT-wrapped tiny Llama with grouped-query attention.

``flash_attention_2`` runs in a child interpreter in which transformers believes
flash-attn is installed (tests/support/pretend_flash_attn.py): the stand-in package is on
``sys.path`` before transformers is imported, so transformers' own flash code (kernel
loading, availability checks, ``flash_attention_forward``, the flash mask builder) runs
exactly as on a GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longlora_plugin import disable_s2_attn, enable_s2_attn
from longlora_plugin.s2 import s2_settings
from s2_harness.models import (
    COMMON,
    assert_same,
    forward_backward,
    model_inputs,
    reference_backend,
)
from tests.support.pretend_flash_attn import STANDIN_DIR

IN_CHILD = "LONGLORA_FLASH_STANDIN"
BACKENDS = ["sdpa", "eager", "flash_attention_2"]
# what transformers dispatches on by substring (docs/s2-attn.md, "Dispatch")
DISPATCH_SUBSTRINGS = ("flash", "flex_attention", "/", "paged|")


def _model(backend: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, **COMMON)
    model = LlamaForCausalLM._from_config(config, attn_implementation=backend)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


def _dispatch_checks(backend: str) -> None:
    plain = _model(backend)
    s2 = copy.deepcopy(plain)
    reference = copy.deepcopy(plain)
    reference.get_base_model().set_attn_implementation(reference_backend(8))

    enable_s2_attn(s2, group_size=8)
    name = s2.get_base_model().config._attn_implementation
    assert s2_settings(s2).backend == backend and name.startswith("longlora_s2_")
    assert not any(part in name for part in DISPATCH_SUBSTRINGS), name

    for layout in ("plain", "padded", "packed"):
        inputs, valid = model_inputs(layout)
        assert_same(forward_backward(s2, inputs, valid), forward_backward(reference, inputs, valid))
        with torch.no_grad():
            assert torch.equal(s2.eval()(**inputs).logits, plain.eval()(**inputs).logits), layout

    prompt = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding, as generation pads
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    expected = plain.eval().generate(input_ids=prompt, **kwargs)
    assert torch.equal(s2.eval().generate(input_ids=prompt, **kwargs), expected)
    disable_s2_attn(s2)
    assert s2.get_base_model().config._attn_implementation == backend
    assert torch.equal(s2.generate(input_ids=prompt, **kwargs), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_dispatch(backend):
    if backend != "flash_attention_2":
        _dispatch_checks(backend)
        return
    if os.environ.get(IN_CHILD):
        from tests.support.pretend_flash_attn import activate

        activate()
        _dispatch_checks(backend)
        return
    env = {**os.environ, IN_CHILD: "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(STANDIN_DIR), env.get("PYTHONPATH", "")])
    here = Path(__file__)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            f"{here}::test_real_dispatch[flash_attention_2]",
        ],
        cwd=here.parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
