"""``longlora_plugin.trainable``: the PEFT ``modules_to_save`` names of LongLoRA's
embeddings and norms, derived from real architectures built on the meta device."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from longlora_plugin.hookspecs import get_plugin_manager, hookimpl
from longlora_plugin.trainable import KINDS, find_trainable_modules

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_kinds_are_the_schema_literal():
    assert KINDS == ("embed", "norm", "lm_head")


def test_llama_untied():
    found = find_trainable_modules(LlamaConfig(**SMALL), ["embed", "norm", "lm_head"])
    assert found.by_kind == {
        "embed": ["embed_tokens"],
        "norm": ["input_layernorm", "post_attention_layernorm", "norm"],
        "lm_head": ["lm_head"],
    }
    assert not found.tied and not found.ensure_weight_tying


def test_tied_lm_head_trains_through_the_embedding():
    config = Qwen2Config(tie_word_embeddings=True, **SMALL)
    found = find_trainable_modules(config, ["embed", "lm_head"])
    assert found.tied and found.ensure_weight_tying
    assert found.names == ["embed_tokens"]
    assert any("tied to the input embedding" in note for note in found.notes)


def test_qwen3_norms_include_q_and_k_norms():
    found = find_trainable_modules(Qwen3Config(head_dim=8, **SMALL), ["norm"])
    assert {"q_norm", "k_norm", "input_layernorm", "norm"} <= set(found.names)


def test_every_name_matches_only_its_kind_as_a_peft_suffix():
    """PEFT matches by suffix: ``norm`` also matches ``input_layernorm`` (a norm too),
    but never a non-norm module."""
    from longlora_plugin.trainable import build_meta_model, is_norm_module

    config = Qwen3Config(head_dim=8, **SMALL)
    model = build_meta_model(config)
    found = find_trainable_modules(config, ["norm"], model=model)
    for name in found.names:
        hits = [m for n, m in model.named_modules() if n.endswith(name)]
        assert hits and all(is_norm_module(m) for m in hits), name


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown trainable kinds \\['norms'\\]"):
        find_trainable_modules(LlamaConfig(**SMALL), ["norms"])


def test_hook_names_replace_the_derivation():
    class Names:
        @hookimpl
        def longlora_trainable_module_names(self, config, kind):
            return ["ln_a", "ln_b"] if kind == "norm" else None

    manager = get_plugin_manager()
    impl = Names()
    manager.register(impl)
    try:
        found = find_trainable_modules(LlamaConfig(**SMALL), ["embed", "norm"])
    finally:
        manager.unregister(impl)
    assert found.by_kind == {"embed": ["embed_tokens"], "norm": ["ln_a", "ln_b"]}
