"""S2-Attn on whole tiny models of several architectures, against the dense reference."""

from __future__ import annotations

import contextlib
import copy
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
)

from longlora_plugin import disable_s2_attn, enable_s2_attn
from longlora_plugin.s2 import s2_settings
from s2_harness.models import (
    COMMON,
    GROUP,
    LENGTH,
    assert_same,
    configs,
    forward_backward,
    model_and_reference,
    model_inputs,
)


@pytest.mark.parametrize("arch", list(configs()))
@pytest.mark.parametrize("layout", ["plain", "padded", "packed"])
def test_model_matches_reference(arch, layout):
    model, reference = model_and_reference(arch)
    inputs, valid = model_inputs(layout)
    assert_same(forward_backward(model, inputs, valid), forward_backward(reference, inputs, valid))


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_eager_backend_matches_reference(layout):
    model, reference = model_and_reference("qwen2", backend="eager")
    inputs, valid = model_inputs(layout)
    assert_same(forward_backward(model, inputs, valid), forward_backward(reference, inputs, valid))


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_gradient_checkpointing(layout):
    model, _ = model_and_reference("llama")
    inputs, valid = model_inputs(layout)
    plain = forward_backward(model, inputs, valid)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(forward_backward(model, inputs, valid), plain, atol=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inputs = {**inputs}
    assert_same(forward_backward(model, inputs, valid), plain, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["plain", "padded", "packed"])
def test_eval_mode_is_bit_identical(backend, layout):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        configs()["mistral-window"], attn_implementation=backend
    ).eval()
    s2 = enable_s2_attn(copy.deepcopy(base), group_size=GROUP).eval()
    inputs, _ = model_inputs(layout)
    with torch.no_grad():
        assert torch.equal(s2(**inputs).logits, base(**inputs).logits)


def test_training_differs_from_full_attention():
    """The patch really runs: in training, S2 logits differ from full attention's."""
    model, _ = model_and_reference("llama")
    inputs, _ = model_inputs("plain")
    model.train()
    with torch.no_grad():
        s2_logits = model(**inputs).logits
        model.eval()
        full_logits = model(**inputs).logits
    # the first unshifted group is causal in both; later tokens lose their distant context
    assert (s2_logits[:, GROUP:] - full_logits[:, GROUP:]).abs().max() > 1e-3


def test_enable_disable_roundtrip_and_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()["llama"], attn_implementation="sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_s2_attn(peft_model, group_size_ratio=0.5)
    assert model.config._attn_implementation.startswith("longlora_s2_sdpa")
    assert s2_settings(peft_model).group_size_ratio == 0.5
    enable_s2_attn(peft_model, group_size=4)  # re-enabling wraps the original backend
    assert s2_settings(model).backend == "sdpa" and s2_settings(model).group_size == 4
    disable_s2_attn(peft_model)
    assert model.config._attn_implementation == "sdpa"
    assert s2_settings(model) is None
    disable_s2_attn(peft_model)  # no-op
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 1}, "group_size=1 is invalid: it must be an integer >= 2"),
        ({"group_size": 2.5}, "group_size=2.5 is invalid"),
        ({"group_size_ratio": 0.0}, "group_size_ratio=0.0 is outside (0, 1]"),
        ({"group_size_ratio": 1.5}, "group_size_ratio=1.5 is outside (0, 1]"),
    ],
)
def test_bad_group_settings_are_rejected(kwargs, message):
    model = AutoModelForCausalLM.from_config(configs()["llama"], attn_implementation="sdpa")
    with pytest.raises(ValueError) as err:
        enable_s2_attn(model, **kwargs)
    assert message in str(err.value)


def test_ratio_too_small_for_the_row_is_a_clear_error():
    model = enable_s2_attn(
        AutoModelForCausalLM.from_config(configs()["llama"], attn_implementation="sdpa"),
        group_size_ratio=0.1,
    ).train()
    with pytest.raises(
        ValueError, match="group_size_ratio=0.1 on rows of 12 tokens gives group size 1"
    ):
        model(input_ids=torch.ones(1, 12, dtype=torch.long))


def test_flash_backend_needs_flash_attn():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn installed: covered by the GPU benchmark")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_config(configs()["llama"], attn_implementation="sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ImportError, match="flash-attn package"):
        enable_s2_attn(model)


@st.composite
def model_batches(draw):
    """A random architecture, group size and per-row layout (packing and right padding)."""
    arch = draw(st.sampled_from(["llama-9-3", "llama-mqa", "mistral-window", "qwen3", "phi3"]))
    group = draw(st.integers(2, 24))
    rows_pos, rows_valid = [], []
    for _ in range(2):
        pad = draw(st.integers(0, 12))
        pos = []
        while len(pos) < LENGTH - pad:
            pos.extend(range(draw(st.integers(1, LENGTH - pad - len(pos)))))
        rows_pos.append(pos + list(range(pad)))
        rows_valid.append([True] * (LENGTH - pad) + [False] * pad)
    return arch, group, torch.tensor(rows_pos), torch.tensor(rows_valid)


@settings(max_examples=20, deadline=None)
@given(model_batches())
def test_model_matches_reference_property(case):
    arch, group, pos, valid = case
    model, reference = model_and_reference(arch, group=group)
    ids = torch.randint(1, 96, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids, "position_ids": pos, "attention_mask": valid.long()}
    assert_same(forward_backward(model, inputs, valid), forward_backward(reference, inputs, valid))


class _HostSyncs(TorchFunctionMode):
    """Counts tensor operations that make the host wait for the device (``item``,
    ``bool``/``int``/``float`` of a tensor, ``tolist``, ``nonzero``, boolean indexing)."""

    NAMES = frozenset(
        {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero"}
    )

    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]
        )
        if not self.paused and (name in self.NAMES or boolean_index):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _without_counting(counter, function):
    """A varlen kernel's CPU stand-in, its own syncs not counted (the real one is a single
    CUDA kernel)."""

    def run(*args, **kwargs):
        counter.paused = True
        try:
            return function(*args, **kwargs)
        finally:
            counter.paused = False

    return run


@pytest.mark.parametrize("kernel", ["sdpa", "torch_varlen", "flash_attn_varlen"])
@pytest.mark.parametrize("layout", ["plain", "padded", "packed"])
def test_host_syncs_do_not_grow_with_layers(kernel, layout):
    """The layout is built once per forward: adding layers adds no host synchronisation,
    with gradient checkpointing's recomputation included."""
    from unittest import mock

    from longlora_plugin.s2 import backend as backend_module
    from longlora_plugin.s2.kernels import FLASH_ATTN_VARLEN, TORCH_VARLEN
    from s2_harness import varlen_contracts

    inputs, _ = model_inputs(layout)
    counts = []
    for layers in (2, 4):
        config = LlamaConfig(
            num_attention_heads=4, num_key_value_heads=2, **{**COMMON, "num_hidden_layers": layers}
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_s2_attn(model, group_size=GROUP).train()
        counter = _HostSyncs()
        with contextlib.ExitStack() as stack:
            if kernel == "torch_varlen":
                stack.enter_context(
                    mock.patch.object(backend_module, "select_kernel", lambda *a: TORCH_VARLEN)
                )
                standin = _without_counting(counter, varlen_contracts.varlen_attn)
                stack.enter_context(mock.patch("torch.nn.attention.varlen.varlen_attn", standin))
            if kernel == "flash_attn_varlen":
                stack.enter_context(
                    mock.patch.object(backend_module, "select_kernel", lambda *a: FLASH_ATTN_VARLEN)
                )
                standin = _without_counting(counter, varlen_contracts.flash_attn_varlen_func)
                module = types.SimpleNamespace(flash_attn_varlen_func=standin)
                stack.enter_context(mock.patch.dict(sys.modules, {"flash_attn": module}))
            with counter:
                model(**inputs).logits.sum().backward()
        counts.append(counter.count)
    assert counts[0] == counts[1], counts
