"""``longlora_plugin.rope``: the rope_parameters a run loads its model with, on real
transformers configs (no Axolotl)."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config

from longlora_plugin.rope import (
    SCALED_TYPES,
    RopeConfigError,
    existing_rope_parameters,
    original_context,
    resolve_rope,
)


def llama(**kw) -> LlamaConfig:
    return LlamaConfig(max_position_embeddings=4096, rope_theta=10000.0, **kw)


def resolve(config, rope_type="linear", factor="auto", sequence_len=16384, original=None):
    return resolve_rope(
        config,
        rope_type=rope_type,
        factor=factor,
        sequence_len=sequence_len,
        original_max_position_embeddings=original,
    )


def test_scaled_types_are_the_rope_types_but_none():
    assert SCALED_TYPES == ("linear", "dynamic", "yarn", "llama3")


def test_linear_auto_factor_keeps_theta_and_raises_max_positions():
    rope = resolve(llama())
    assert rope.scaled and (rope.rope_type, rope.factor) == ("linear", 4.0)
    assert (rope.original, rope.target) == (4096, 16384)
    assert rope.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert rope.config_overrides["max_position_embeddings"] == 16384
    assert rope.log_line() == "longlora: RoPE linear factor 4.0 (original 4096, target 16384)"


def test_nothing_to_scale_when_the_sequence_fits_or_factor_is_one():
    for rope in (resolve(llama(), sequence_len=4096), resolve(llama(), factor=1.0)):
        assert not rope.scaled and rope.config_overrides == {}
        assert (rope.rope_type, rope.factor) == ("default", 1.0)
    assert not resolve(llama(), rope_type="none").scaled


def test_explicit_factor_and_original_context():
    rope = resolve(llama(), factor=25.0, sequence_len=100000)
    assert rope.factor == 25.0 and rope.config_overrides["max_position_embeddings"] == 102400
    assert resolve(llama(), original=2048, sequence_len=8192).factor == 4.0


def test_yarn_and_llama3_get_their_required_keys():
    yarn = resolve(llama(), rope_type="yarn")
    assert yarn.rope_parameters["original_max_position_embeddings"] == 4096
    llama3 = resolve(llama(), rope_type="llama3")
    assert llama3.rope_parameters["low_freq_factor"] == 1.0
    assert llama3.rope_parameters["high_freq_factor"] == 4.0


def test_dynamic_keeps_the_original_max_positions():
    config = llama()
    config.max_position_embeddings = 16384  # what Axolotl raises it to
    rope = resolve(config, rope_type="dynamic", original=4096)
    assert rope.config_overrides["max_position_embeddings"] == 4096


def test_apply_to_config_dict_replaces_the_legacy_alias():
    rope = resolve(llama())
    data = rope.apply_to_config_dict({"model_type": "llama", "rope_scaling": {"type": "x"}})
    assert "rope_scaling" not in data and data["rope_parameters"]["factor"] == 4.0


def test_architecture_that_rejects_the_type_is_named():
    with pytest.raises(RopeConfigError, match="model type 'phi3' rejects rope_parameters"):
        resolve(Phi3Config(max_position_embeddings=4096, original_max_position_embeddings=4096))


def test_per_layer_rope_is_refused_with_a_way_out():
    config = Gemma3TextConfig()
    with pytest.raises(RopeConfigError, match="per-layer-type rope_parameters.*type: none"):
        existing_rope_parameters(config)
    assert not resolve(config, rope_type="none").scaled


def test_original_context_order():
    assert original_context(llama()) == 4096
    assert original_context(llama(), explicit=2048) == 2048
    phi3 = Phi3Config(max_position_embeddings=131072, original_max_position_embeddings=4096)
    assert original_context(phi3) == 4096
