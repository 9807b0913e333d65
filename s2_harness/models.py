"""Whole tiny models for the S2 tests and the GPU check: architectures, inputs in three
row layouts, a dense-reference attention backend, and the comparison of two runs."""

from __future__ import annotations

import copy

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import AttentionMaskInterface

from longlora_plugin import enable_s2_attn
from s2_harness.reference import dense_attention, s2_allowed

LAYOUTS = ("plain", "padded", "packed")
GROUP = 8
LENGTH = 40
COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def configs():
    return {
        "llama": LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "llama-9-3": LlamaConfig(
            num_attention_heads=9, num_key_value_heads=3, **{**COMMON, "hidden_size": 72}
        ),
        "llama-mqa": LlamaConfig(num_attention_heads=4, num_key_value_heads=1, **COMMON),
        "mistral-window": MistralConfig(
            num_attention_heads=4, num_key_value_heads=2, sliding_window=6, **COMMON
        ),
        "qwen2": Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON),
        "qwen3": Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=12, **COMMON),
        "phi3": Phi3Config(num_attention_heads=4, num_key_value_heads=2, **COMMON),
    }


def reference_backend(group: int) -> str:
    """Register (once) a dense S2 reference backend for ``group``; return its name. Its
    mask builder hands over the raw 2D padding mask."""
    name = f"s2_reference_g{group}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        batch, heads, length, _ = query.shape
        pos = kwargs["position_ids"].expand(batch, length)
        valid = (
            torch.ones(batch, length, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        allowed = s2_allowed(pos, valid, heads, group, kwargs.get("sliding_window"))
        return dense_attention(query, key, value, allowed, kwargs["scaling"]), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, lambda **kw: kw.get("attention_mask"))
    return name


def model_and_reference(arch, backend="sdpa", group=GROUP):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[arch], attn_implementation=backend)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(reference_backend(group))
    enable_s2_attn(model, group_size=group)
    return model, reference


def model_inputs(layout):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, LENGTH), generator=gen)
    if layout == "padded":
        mask = torch.ones(2, LENGTH, dtype=torch.long)
        mask[1, 29:] = 0
        return {"input_ids": ids, "attention_mask": mask}, mask.bool()
    if layout == "packed":
        pos = torch.cat([torch.arange(13), torch.arange(19), torch.arange(8)])[None].expand(2, -1)
        return {"input_ids": ids, "position_ids": pos}, torch.ones(2, LENGTH, dtype=torch.bool)
    return {"input_ids": ids}, torch.ones(2, LENGTH, dtype=torch.bool)


def forward_backward(model, inputs, valid):
    model.train()
    model.zero_grad()
    logits = model(**inputs).logits
    # O(1) gradients, so 1e-5 absolute is a real bound in fp32
    weight = (
        0.05
        * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        * valid[..., None]
    )
    (logits * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach() * valid[..., None], grads


def assert_same(a, b, atol=1e-5):
    logits_a, grads_a = a
    logits_b, grads_b = b
    assert (logits_a - logits_b).abs().max() <= atol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() <= atol, name
