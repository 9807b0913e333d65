"""Config handling of LongLoRAPlugin, through Axolotl's real ``load_cfg``.

Every bad input listed in the issue must fail in ``load_cfg`` (the plugin's
``register`` hook, before validation and before any weights load) with a message
naming the key, the value and what is allowed. Without a ``longlora:`` block the
plugin must change nothing. No model is trained here (see test_plugin_train.py).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.tiny_models import CPU_AXOLOTL

PLUGIN = "longlora_plugin.LongLoRAPlugin"


def make_cfg(model_dir: Path, dataset: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A raw Axolotl config (as read from YAML) for a CPU LoRA run with the plugin."""
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "plugins": [PLUGIN],
        "longlora": {},
        "datasets": [{"path": str(dataset), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "out"),
        "sequence_len": 256,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        **CPU_AXOLOTL,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": 1,
        "learning_rate": 1e-3,
    }
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def load(cfg: dict[str, Any]):
    """Axolotl's own config loading: plugins' register, validation, normalisation."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    loaded = load_cfg(DictDefault(copy.deepcopy(cfg)))
    Path(loaded.axolotl_config_path).unlink(missing_ok=True)  # load_cfg's temp YAML copy
    return loaded


@pytest.fixture
def cfg_for(tiny_llama: Path, text_dataset: Path, tmp_path: Path):
    def build(model_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
        return make_cfg(model_dir or tiny_llama, text_dataset, tmp_path, **overrides)

    return build


def assert_error(cfg: dict[str, Any], *fragments: str) -> str:
    """``load_cfg`` raises a ValueError whose message contains every fragment."""
    with pytest.raises(ValueError) as info:
        load(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("block", "fragments"),
    [
        ({"group_size_ratio": 1.5}, ["longlora.group_size_ratio=1.5", "outside (0, 1]"]),
        ({"group_size_ratio": 0}, ["longlora.group_size_ratio=0", "outside (0, 1]"]),
        ({"group_size_ratio": -0.25}, ["longlora.group_size_ratio=-0.25", "outside (0, 1]"]),
        (
            {"group_size": 64, "group_size_ratio": 0.25},
            ["longlora.group_size=64", "longlora.group_size_ratio=0.25", "set only one"],
        ),
        ({"group_size": 1}, ["longlora.group_size=1", ">= 2", "<= sequence_len"]),
        ({"group_size": 16.5}, ["longlora.group_size=16.5", "integer"]),
        ({"rope": {"factor": 0.5}}, ["longlora.rope.factor=0.5", "< 1", "'auto' or a number >= 1"]),
        (
            {"rope": {"factor": "fast"}},
            ["longlora.rope.factor='fast'", "neither 'auto' nor a number", "'auto' or a number"],
        ),
        ({"rope": {"factor": True}}, ["longlora.rope.factor=True", "'auto' or a number >= 1"]),
        (
            {"rope": {"type": "ntk"}},
            ["longlora.rope.type='ntk'", "linear, dynamic, yarn, llama3, none"],
        ),
        (
            {"s2_atn": False},
            ["longlora.s2_atn", "unknown key", "s2_attn, group_size, group_size_ratio"],
        ),
        (
            {"rope": {"factr": 2}},
            [
                "longlora.rope.factr",
                "unknown key",
                "type, factor, original_max_position_embeddings",
            ],
        ),
        (
            {"trainable_params": ["embed", "norms"]},
            ["longlora.trainable_params", "'norms'", "embed, norm, lm_head"],
        ),
        (
            {"trainable_params": "embed"},
            ["longlora.trainable_params='embed'", "a list of embed, norm, lm_head"],
        ),
        ({"s2_attn": "yes"}, ["longlora.s2_attn='yes'", "true or false"]),
        (
            {"rope": {"original_max_position_embeddings": -4}},
            ["longlora.rope.original_max_position_embeddings=-4", "integer >= 1"],
        ),
    ],
)
def test_bad_block_is_rejected_with_key_value_and_allowed(cfg_for, block, fragments):
    assert_error(cfg_for(longlora=block), *fragments)


def test_all_problems_reported_at_once(cfg_for):
    message = assert_error(
        cfg_for(longlora={"group_size_ratio": 2, "rope": {"type": "ntk", "factor": 0}})
    )
    assert len(re.findall(r"^  longlora\.", message, flags=re.M)) == 3, message


def test_block_not_a_mapping(cfg_for):
    assert_error(cfg_for(longlora="on"), "longlora='on'", "not a mapping", "s2_attn")


def test_group_size_larger_than_sequence_len(cfg_for):
    assert_error(
        cfg_for(longlora={"group_size": 512}),
        "longlora.group_size=512",
        "sequence_len=256",
        "2 <= group_size <= sequence_len",
    )


def test_ratio_giving_group_below_two(cfg_for):
    assert_error(
        cfg_for(longlora={"group_size_ratio": 0.001}),
        "longlora.group_size_ratio=0.001",
        "= 0",
        ">= 2",
    )


def test_group_size_not_checked_against_sequence_len_without_s2(cfg_for):
    cfg = load(cfg_for(sequence_len=4, longlora={"s2_attn": False, "rope": {"type": "none"}}))
    assert cfg.longlora["s2_attn"] is False


def test_model_without_rope_is_refused(cfg_for, tmp_path):
    from transformers import GPT2Config

    no_rope = tmp_path / "gpt2-config-only"  # config only: the check needs no weights
    GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(no_rope)
    assert_error(
        cfg_for(model_dir=no_rope),
        "longlora.rope.type='linear'",
        "'gpt2'",
        "no rope_parameters/rope_theta",
        "longlora.rope.type: none",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"attn_implementation": "flash_attention_2"}, ["attn_implementation='flash_attention_2'"]),
        ({"attn_implementation": None, "flash_attention": True}, ["flash_attention=True"]),
    ],
)
def test_flash_attention_without_flash_attn(cfg_for, overrides, fragments):
    """Training with flash_attention_2 fails before the model is built; merging the same
    config (axolotl merge-lora runs no attention kernel) does not."""
    from importlib.util import find_spec

    if find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    cfg = load(cfg_for(**overrides))
    plugin = _longlora_plugin()
    with pytest.raises(ValueError) as info:
        plugin.pre_model_load(cfg)
    for fragment in (*fragments, "flash-attn", "attn_implementation: sdpa"):
        assert fragment in str(info.value)
    plugin.pre_model_load(load(cfg_for(merge_lora=True, **overrides)))


def test_s2_over_unsupported_backend(cfg_for):
    assert_error(
        cfg_for(attn_implementation="flex_attention"),
        "attn_implementation='flex_attention'",
        "sdpa, eager, flash_attention_2",
        "longlora.s2_attn: false",
    )


def test_unfrozen_parameters_with_adapter(cfg_for):
    assert_error(
        cfg_for(unfrozen_parameters=["model.norm.weight"]),
        "unfrozen_parameters=['model.norm.weight']",
        "adapter='lora'",
        "longlora.trainable_params",
    )


def test_removed_s2_attention_key(cfg_for):
    assert_error(cfg_for(s2_attention=True), "s2_attention=True", "longlora.s2_attn")


def test_user_rope_parameters_conflict(cfg_for):
    user = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert_error(
        cfg_for(model_config={"rope_parameters": user}),
        "model_config.rope_parameters=",
        "longlora.rope.type='linear'",
        "longlora.rope.type: none",
    )


def test_rope_type_rejected_by_architecture(cfg_for, tiny_model_factory):
    # transformers' Phi3Config accepts only longrope (or default) rope_parameters.
    assert_error(
        cfg_for(model_dir=tiny_model_factory("phi3")),
        "longlora.rope.type='linear'",
        "'phi3'",
        "longrope",
    )


# ------------------------------------------------------------------ what register writes
def test_defaults_write_rope_and_modules_to_save(cfg_for):
    cfg = load(cfg_for())
    assert cfg.overrides_of_model_config["rope_parameters"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "rope_theta": 10000.0,
    }
    assert cfg.overrides_of_model_config["max_position_embeddings"] == 256
    assert cfg.lora_modules_to_save == [
        "embed_tokens",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    ]
    assert cfg.longlora["s2_attn"] is True
    assert cfg.longlora["rope"] == {"type": "linear", "factor": "auto"}
    assert not cfg.get("s2_attention")


def test_user_modules_to_save_and_model_config_are_kept(cfg_for):
    cfg = load(
        cfg_for(
            lora_modules_to_save=["lm_head", "norm"],
            model_config={"initializer_range": 0.05},
            longlora={"trainable_params": ["embed", "norm", "lm_head"]},
        )
    )
    assert cfg.lora_modules_to_save == [
        "lm_head",
        "norm",
        "embed_tokens",
        "input_layernorm",
        "post_attention_layernorm",
    ]
    assert cfg.overrides_of_model_config["initializer_range"] == 0.05
    assert cfg.overrides_of_model_config["rope_parameters"]["factor"] == 4.0


@pytest.mark.parametrize("key", ["embedding_lr_scale", "embedding_lr"])
def test_embedding_lr_reaching_the_norms_is_named(cfg_for, caplog, key):
    caplog.set_level(logging.INFO, logger="longlora_plugin")
    load(cfg_for(**{key: 0.1}))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in warned if f"{key}=0.1 also applies to the norms" in m], warned
    caplog.clear()
    load(cfg_for(**{key: 0.1}, longlora={"trainable_params": ["embed"]}))
    assert "also applies to the norms" not in caplog.text


def test_full_finetune_adds_no_modules_to_save(cfg_for):
    cfg = load(cfg_for(adapter=None, lora_r=None, lora_alpha=None, lora_target_modules=None))
    assert not cfg.lora_modules_to_save
    assert cfg.overrides_of_model_config["rope_parameters"]["rope_type"] == "linear"


def test_no_interpolation_when_sequence_fits(cfg_for, caplog):
    caplog.set_level(logging.INFO, logger="longlora_plugin")
    cfg = load(cfg_for(sequence_len=48))
    assert not cfg.overrides_of_model_config
    assert "sequence_len 48 <= original context 64: no RoPE interpolation" in caplog.text


@pytest.mark.parametrize(
    ("rope", "expected"),
    [
        (
            {"type": "yarn", "factor": 8},
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
        (
            {"type": "llama3", "original_max_position_embeddings": 32},
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "rope_theta": 10000.0,
            },
        ),
        ({"type": "dynamic"}, {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
    ],
)
def test_rope_types(cfg_for, rope, expected):
    cfg = load(cfg_for(longlora={"rope": rope}))
    assert cfg.overrides_of_model_config["rope_parameters"] == expected
    if rope["type"] == "dynamic":  # dynamic NTK reads max_position_embeddings as the original
        assert "max_position_embeddings" not in cfg.overrides_of_model_config


def test_rope_none_leaves_model_config_alone(cfg_for):
    cfg = load(cfg_for(longlora={"rope": {"type": "none"}}))
    assert not cfg.overrides_of_model_config


def test_register_is_idempotent(cfg_for):
    from axolotl.utils.dict import DictDefault

    from longlora_plugin import LongLoRAPlugin

    cfg = DictDefault(cfg_for())
    plugin = LongLoRAPlugin()
    plugin.register(cfg)
    once = copy.deepcopy(cfg.to_dict())
    plugin.register(cfg)
    assert cfg.to_dict() == once


def test_tied_embeddings_use_weight_tying(cfg_for, tiny_model_factory):
    tied = tiny_model_factory("qwen2", tie_word_embeddings=True)
    cfg = load(cfg_for(model_dir=tied, longlora={"trainable_params": ["embed", "norm", "lm_head"]}))
    assert cfg.lora_modules_to_save == [
        "embed_tokens",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    ]
    assert cfg.peft_ensure_weight_tying is True


def test_zero3_with_modules_to_save_needs_a_deepspeed_that_serves_them(cfg_for, monkeypatch):
    """DeepSpeed before 0.19.3 crashes in the first ZeRO-3 forward on PEFT's wrappers of
    the modules trained in full; the installed version is read from the package metadata."""
    from longlora_plugin.axolotl import checks
    from tests.support.ranks import ZERO

    monkeypatch.setattr(checks, "version", lambda name: "0.18.9")
    message = assert_error(
        cfg_for(deepspeed=ZERO[3]),
        f"deepspeed={ZERO[3]!r} (ZeRO-3)",
        "longlora.trainable_params=['embed', 'norm'] needs deepspeed>=0.19.3",
        "installed: 0.18.9",
        "ds_grads_remaining",
        "or use ZeRO-2",
    )
    assert "#7615" in message
    # ZeRO-2, and ZeRO-3 for plain LoRA, do not go through those hooks: allowed; so is
    # ZeRO-3 with the DeepSpeed the dev extra installs (tests/axolotl/test_sharding.py)
    from axolotl.utils.dict import DictDefault

    from longlora_plugin.axolotl.plugin_hooks import LongLoRAPlugin

    # register only: loading a valid DeepSpeed config starts torch.distributed in-process
    LongLoRAPlugin().register(DictDefault(cfg_for(deepspeed=ZERO[2])))
    LongLoRAPlugin().register(
        DictDefault(cfg_for(deepspeed=ZERO[3], longlora={"trainable_params": []}))
    )


@pytest.mark.parametrize(
    "fsdp",
    [
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
        {"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}},
    ],
)
def test_fsdp2_lora_with_trainable_modules_is_refused(cfg_for, fsdp):
    message = assert_error(
        cfg_for(**fsdp), "fsdp_config (FSDP2)", "save_fsdp2_lora_adapter", "DeepSpeed"
    )
    assert "longlora.trainable_params=['embed', 'norm']" in message
    plain_lora = cfg_for(**fsdp, longlora={"trainable_params": []})
    assert load(plain_lora).longlora is not None  # nothing to lose at save: allowed


def test_eval_during_training_needs_the_whole_model_on_the_main_process(cfg_for):
    from tests.support.ranks import ZERO

    block = {"eval": {"every_n_steps": 10}}
    assert_error(
        cfg_for(deepspeed=ZERO[3], longlora=block),
        "longlora.eval.every_n_steps=10 with a sharded model (DeepSpeed ZeRO-3)",
        "use DDP/ZeRO-2",
    )
    assert_error(
        cfg_for(
            fsdp_version=2,
            fsdp_config={"reshard_after_forward": True},
            longlora={**block, "trainable_params": []},
        ),
        "longlora.eval.every_n_steps=10 with a sharded model (FSDP)",
    )


def test_context_parallel_refusals_name_the_conflict(cfg_for, monkeypatch):
    """``longlora.context_parallel`` splits S2-Attn rows: refused without S2, with FSDP,
    with Axolotl's ring attention, with RL, and on a process count it does not divide
    (checked at ``register`` when the launcher sets ``WORLD_SIZE``; a single process may
    be ``merge-lora`` of the run, so there it is checked when the trainer starts)."""
    assert_error(cfg_for(longlora={"context_parallel": 0}), "longlora.context_parallel=0", ">= 1")
    assert_error(
        cfg_for(longlora={"context_parallel": 2, "s2_attn": False}),
        "longlora.context_parallel=2 with longlora.s2_attn: false",
    )
    assert_error(
        cfg_for(
            longlora={"context_parallel": 2, "trainable_params": []},
            fsdp_version=2,
            fsdp_config={"reshard_after_forward": True},
        ),
        "longlora.context_parallel=2 with FSDP",
        "DDP and DeepSpeed ZeRO-3",
    )
    assert_error(
        cfg_for(longlora={"context_parallel": 2}, context_parallel_size=2),
        "with Axolotl's context_parallel_size=2",
    )
    assert_error(
        cfg_for(longlora={"context_parallel": 2, "eval": {"every_n_steps": 5}}),
        "longlora.context_parallel=2 with longlora.eval.every_n_steps=5",
        "val_set_size",
    )
    assert load(cfg_for(longlora={"context_parallel": 2})).longlora["context_parallel"] == 2
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert_error(
        cfg_for(longlora={"context_parallel": 4}),
        "longlora.context_parallel=4 does not divide the 6 process(es)",
        "--nproc_per_node 4",
    )


RING = {"attn_implementation": "flash_attention_2", "micro_batch_size": 1, "sample_packing": True}


@pytest.mark.parametrize(
    ("overrides", "written"),
    [
        ({"context_parallel_size": 2}, "context_parallel_size=2"),
        ({"sequence_parallel_degree": 2}, "sequence_parallel_degree=2"),
        ({"context_parallel_size": 4, "longlora": {"context_parallel": 2}}, None),
    ],
    ids=["context_parallel_size", "sequence_parallel_degree", "with-longlora-cp"],
)
def test_s2_attn_with_axolotl_ring_attention_is_refused(cfg_for, overrides, written):
    """Axolotl's ring context parallelism patches transformers' flash path; S2-Attn calls
    the kernel itself, so each rank would attend only inside its own chunk: refused at
    ``register`` whatever ``longlora.context_parallel`` is, naming both keys and the two
    ways out, before Axolotl's validation (which would ask for ring_flash_attn)."""
    cp = overrides.get("longlora", {}).get("context_parallel", 1)
    written = written or "context_parallel_size=4"
    assert_error(
        cfg_for(**{**RING, **overrides}),
        f"longlora.s2_attn: true (longlora.context_parallel={cp})",
        f"with Axolotl's {written} (ring attention)",
        "longlora.context_parallel: P",
        "multiple of P processes",
        "or longlora.s2_attn: false",
    )


def test_axolotl_ring_attention_without_s2_is_left_to_axolotl(cfg_for):
    """With ``longlora.s2_attn: false`` the attention is the model's own, which ring
    attention serves: the plugin lets it through (Axolotl's validation then checks
    flash-attn and ring_flash_attn itself)."""
    from axolotl.utils.dict import DictDefault

    from longlora_plugin import LongLoRAPlugin

    for key in ("context_parallel_size", "sequence_parallel_degree"):
        cfg = DictDefault(cfg_for(**RING, longlora={"s2_attn": False}, **{key: 2}))
        LongLoRAPlugin().register(cfg)
        assert cfg[key] == 2
        try:
            load(cfg.to_dict())
        except (ValueError, ImportError) as err:  # Axolotl's own requirements, not ours
            assert "longlora" not in str(err), err
    assert load(cfg_for(context_parallel_size=1)).context_parallel_size == 1


def test_axolotl_train_refuses_s2_with_ring_attention_before_training(
    tiny_llama, text_dataset, tmp_path
):
    """A real ``axolotl train``: the plugin's refusal comes from ``register``, before
    Axolotl's validation (which would name flash-attn or ring_flash_attn) and before any
    step."""
    from tests.support.ranks import axolotl, lora_config, write_config

    cfg = lora_config(tiny_llama, text_dataset, tmp_path, context_parallel_size=2, **RING)
    proc = axolotl("train", write_config(tmp_path / "cfg.yml", cfg), check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert (
        "LongLoRAConfigError: longlora.s2_attn: true (longlora.context_parallel=1) with "
        "Axolotl's context_parallel_size=2 (ring attention)" in proc.stdout
    ), proc.stdout[-3000:]
    assert "ring_flash_attn" not in proc.stdout and "requires attn_implementation" not in (
        proc.stdout
    )
    assert not (tmp_path / "out" / "rank_probe").exists()  # written at the first step
    assert "'loss'" not in proc.stdout


def test_axolotl_fsdp2_adapter_save_still_loses_modules_to_save(tmp_path, tiny_model_factory):
    """Why the refusal above exists, on the installed Axolotl: its final FSDP2 LoRA save
    collects only ``lora_*`` tensors, and PEFT then fails on every ``modules_to_save``
    entry. (One process: the function gathers nothing without a process group.) If this
    starts to pass, Axolotl saves embeddings and norms under FSDP2: lift the refusal."""
    from axolotl.integrations.expert_parallel.shard import save_fsdp2_lora_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    lora = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "norm"])
    with pytest.raises(KeyError, match="modules_to_save.default.weight"):
        save_fsdp2_lora_adapter(get_peft_model(model, lora), str(tmp_path))


def test_qwen3_norms_include_qk_norm(cfg_for, tiny_model_factory):
    cfg = load(
        cfg_for(model_dir=tiny_model_factory("qwen3"), longlora={"trainable_params": ["norm"]})
    )
    assert set(cfg.lora_modules_to_save) == {
        "q_norm",
        "k_norm",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    }


def test_hook_supplies_architecture_names(cfg_for):
    from longlora_plugin.hookspecs import get_plugin_manager, hookimpl

    class MyArchitecture:
        @hookimpl
        def longlora_trainable_module_names(self, config, kind):
            if config.model_type == "llama" and kind == "norm":
                return ["input_layernorm", "norm"]
            return None

    manager = get_plugin_manager()
    impl = MyArchitecture()
    manager.register(impl)
    try:
        cfg = load(cfg_for())
    finally:
        manager.unregister(impl)
    assert cfg.lora_modules_to_save == ["embed_tokens", "input_layernorm", "norm"]


def test_empty_block_warns_and_does_nothing(cfg_for, caplog):
    caplog.set_level(logging.WARNING, logger="longlora_plugin")
    raw = cfg_for(longlora=None)
    raw["longlora"] = None
    cfg = load(raw)
    assert not cfg.lora_modules_to_save
    assert not cfg.overrides_of_model_config
    assert "longlora: {}" in caplog.text


# ------------------------------------------------------------------ no block: no change
def _comparable(cfg) -> dict[str, Any]:
    out = cfg.to_dict()
    for key in ("plugins", "axolotl_config_path"):
        out.pop(key, None)
    return json.loads(json.dumps(out, default=str))


def test_no_block_means_no_config_change(cfg_for):
    with_plugin = load(cfg_for(longlora=None))
    without_plugin = load(cfg_for(longlora=None, plugins=None))
    assert _comparable(with_plugin) == _comparable(without_plugin)


def test_no_block_means_no_hook_does_anything(cfg_for, tiny_llama, tmp_path, caplog):
    from axolotl.utils.dict import DictDefault
    from transformers import AutoModelForCausalLM

    from longlora_plugin import LongLoRAPlugin

    caplog.set_level(logging.DEBUG, logger="longlora_plugin")
    raw = DictDefault(cfg_for(longlora=None))
    before = copy.deepcopy(raw.to_dict())
    plugin = LongLoRAPlugin()
    plugin.register(raw)
    assert raw.to_dict() == before

    cfg = load(cfg_for(longlora=None))
    snapshot = copy.deepcopy(cfg.to_dict())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    config_before = model.config.to_dict()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))

    plugin.pre_model_load(cfg)
    plugin.post_model_build(cfg, model)
    plugin.post_model_load(cfg, model)
    plugin.post_train(cfg, model)
    plugin.post_train(cfg, model)
    plugin.post_lora_merge(cfg, str(tmp_path), str(merged))

    assert model.config._attn_implementation == "sdpa"
    assert model.config.to_dict() == config_before
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert cfg.to_dict() == snapshot
    assert json.loads((merged / "config.json").read_text()) == {"model_type": "llama"}
    assert not [r for r in caplog.records if r.name == "longlora_plugin"]


MODULE_PATH = "longlora_plugin.axolotl.plugin_hooks.LongLoRAPlugin"  # where the class lives


def _spellings() -> list[tuple[list[str], int]]:
    """Every accepted way to name the plugin, with the number of instances Axolotl
    registers for it. Axolotl keys plugins by the name they are listed under; 0.21 also
    takes ``module:Class`` and registers installed entry points by itself (ours as
    ``longlora_plugin.LongLoRAPlugin``, so no listing at all works, and any other
    spelling adds a second instance)."""
    from axolotl.integrations import base

    if not hasattr(base, "get_builtin_plugins"):  # 0.19: only what the config lists
        return [
            (["longlora_plugin.LongLoRAPlugin"], 1),
            ([MODULE_PATH], 1),
            (["longlora_plugin.LongLoRAPlugin", MODULE_PATH], 2),
        ]
    return [
        (["longlora_plugin.LongLoRAPlugin"], 1),
        (["longlora_plugin:LongLoRAPlugin"], 1),
        ([MODULE_PATH], 2),
        (["longlora_plugin.LongLoRAPlugin", MODULE_PATH], 2),
        (["longlora_plugin:LongLoRAPlugin", MODULE_PATH], 2),
        ([], 1),
    ]


@pytest.mark.parametrize(
    "plugins, instances",
    _spellings(),
    ids=["+".join(plugins) or "entry-point" for plugins, _ in _spellings()],
)
def test_one_plugin_acts_whatever_the_spelling(cfg_for, plugins, instances, monkeypatch):
    """One instance acts, so each hook and the end-of-training eval run once; two
    instances also broke Axolotl 0.21's schema merge (``duplicate base class
    LongLoRAArgs``). Axolotl's own ``load_cfg`` really registers two where said."""
    from longlora_plugin.axolotl.modules_to_save import add_trainable_modules
    from longlora_plugin.axolotl.plugin_hooks import LongLoRAPlugin

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return add_trainable_modules(*args, **kwargs)

    monkeypatch.setattr("longlora_plugin.axolotl.plugin_hooks.add_trainable_modules", counting)
    cfg = load(cfg_for(plugins=plugins or None))
    mine = [p for p in _plugins().values() if isinstance(p, LongLoRAPlugin)]
    assert len(mine) == instances
    acting = [p for p in mine if p.is_primary()]
    assert len(acting) == 1 and acting[0]._rope is not None and cfg.longlora is not None
    assert len(calls) == 1
    assert cfg.lora_modules_to_save == [
        "embed_tokens",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
    ]


# ------------------------------------------------------------------ model hooks in-process
def _built_model(cfg: Any, base: Path, attn_implementation: str | None = "sdpa"):
    """The model Axolotl's loader builds from ``cfg`` (its ``model_config`` overrides)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    for key, value in cfg.overrides_of_model_config.items():
        setattr(config, key, value)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(base, config=config, **kwargs)


def test_model_hooks_log_switch_and_restore(cfg_for, tiny_llama, caplog):

    from longlora_plugin import LongLoRAPlugin

    caplog.set_level(logging.INFO, logger="longlora_plugin")
    cfg = load(cfg_for(longlora={"group_size": 48}))
    plugin = _longlora_plugin()
    assert isinstance(plugin, LongLoRAPlugin)
    model = _built_model(cfg, tiny_llama)

    plugin.post_model_build(cfg, model)
    assert model.config._attn_implementation != "sdpa"
    assert "longlora: S2-Attn on 2 attention layers, group size 48, shift 24" in caplog.text
    assert "longlora: RoPE linear factor 4.0 (original 64, target 256)" in caplog.text

    plugin.post_train(cfg, model)
    plugin.post_train(cfg, model)  # Axolotl calls it twice
    assert model.config._attn_implementation == "sdpa"
    assert caplog.text.count("S2-Attn off") == 1


def test_context_parallel_on_one_process_fails_when_the_trainer_starts(cfg_for, tiny_llama):
    """One process passes ``register`` (it may be ``merge-lora`` of the run); the
    training hook then refuses, naming the key, the count and how to launch."""

    from longlora_plugin.config import LongLoRAConfigError

    cfg = load(cfg_for(longlora={"group_size": 48, "context_parallel": 2}))
    plugin = _longlora_plugin()
    model = _built_model(cfg, tiny_llama)
    plugin.post_model_build(cfg, model)
    with pytest.raises(LongLoRAConfigError) as info:
        plugin.post_trainer_create(cfg, trainer=None)
    message = str(info.value)
    assert "longlora.context_parallel=2 does not divide the 1 process(es)" in message
    assert "--nproc_per_node 2" in message
    plugin.post_train(cfg, model)


def test_context_parallel_refuses_label_smoothing(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from longlora_plugin.axolotl.split_training_step import split_rows
    from longlora_plugin.s2.context_parallel import ContextParallel

    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args)
    with pytest.raises(NotImplementedError, match="label_smoothing_factor: 0"):
        split_rows(trainer, ContextParallel())


@pytest.fixture
def single_process_group():
    """A one-rank gloo process group (what FSDP needs to wrap a model), torn down after."""
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_post_train_unwraps_an_fsdp1_full_finetune_model(cfg_for, tiny_llama, single_process_group):
    """Axolotl hands post_train the trainer's model: FSDP1-wrapped in a full fine-tune."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    cfg = load(cfg_for(adapter=None, longlora={"group_size": 48}))
    plugin = _longlora_plugin()
    model = _built_model(cfg, tiny_llama)
    plugin.post_model_build(cfg, model)
    assert model.config._attn_implementation.startswith("longlora_s2_")
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    plugin.post_train(cfg, wrapped)
    assert model.config._attn_implementation == "sdpa"


def test_dynamic_rope_keeps_original_max_positions(cfg_for, tiny_llama):

    cfg = load(cfg_for(longlora={"s2_attn": False, "rope": {"type": "dynamic"}}))
    plugin = _longlora_plugin()
    model = _built_model(cfg, tiny_llama, attn_implementation=None)
    model.config.max_position_embeddings = 256  # what Axolotl's loader does after building
    plugin.post_model_load(cfg, model)
    assert model.config.max_position_embeddings == 64
    assert model.config.rope_parameters["rope_type"] == "dynamic"


def test_post_lora_merge_writes_rope(cfg_for, tmp_path):
    cfg = load(cfg_for())
    plugin = _longlora_plugin()
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(
        json.dumps({"model_type": "llama", "rope_parameters": {"rope_type": "default"}})
    )
    plugin.post_lora_merge(cfg, str(tmp_path), str(merged))
    plugin.post_lora_merge(cfg, str(tmp_path), str(merged))
    data = json.loads((merged / "config.json").read_text())
    assert data["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert data["max_position_embeddings"] == 256


def _plugins() -> dict[str, Any]:
    from axolotl.integrations.base import PluginManager

    return PluginManager.get_instance().plugins


def _longlora_plugin():
    """The LongLoRA plugin instance that acts in Axolotl's manager after ``load_cfg``."""
    from longlora_plugin import LongLoRAPlugin

    (plugin,) = [p for p in _plugins().values() if isinstance(p, LongLoRAPlugin) and p.is_primary()]
    return plugin


# ------------------------------------------------------------------ longlora.eval
def test_eval_block_passes_axolotl_validation(cfg_for, text_dataset):
    block = {"eval": {"ppl_lengths": [64, 256], "data": str(text_dataset), "max_windows": 4}}
    loaded = load(cfg_for(longlora=block))
    evaluation = dict(loaded.longlora["eval"])
    assert evaluation["ppl_lengths"] == [64, 256] and evaluation["max_windows"] == 4
    assert evaluation["conventions"] == ["window-mean", "sliding-window"]


def test_eval_block_errors_before_training(cfg_for, tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    assert_error(
        cfg_for(longlora={"eval": {"ppl_lengths": [64], "data": missing}}),
        f"longlora.eval.data={missing!r}",
        "does not exist",
    )
    assert_error(
        cfg_for(longlora={"eval": {"passkey_lengths": [256], "passkey_trials": 0}}),
        "longlora.eval.passkey_trials=0",
        "integer >= 1",
    )


def test_s2_with_flash_attention_2_refused_where_axolotl_would_pick_fa4(cfg_for, monkeypatch):
    """On an SM90+ GPU with FlashAttention-4 installed, Axolotl's model loader turns
    ``flash_attention_2`` into ``flash_attention_4``, which S2 does not wrap: refused at
    ``register``, before the model loads. A CPU has no such GPU, so Axolotl's own
    ``fa4_usable`` is made to say yes; everywhere else it says no and nothing changes."""
    from axolotl.monkeypatch.attention import flash_attn_4

    flash = {"attn_implementation": "flash_attention_2"}
    assert not flash_attn_4.fa4_usable()  # this machine: register goes on to the next checks
    monkeypatch.setattr(flash_attn_4, "fa4_usable", lambda model_config=None: True)
    assert_error(
        cfg_for(**flash),
        "attn_implementation='flash_attention_2'",
        "flash_attention_4",
        "attn_implementation: sdpa",
        "longlora.s2_attn: false",
    )
    load(cfg_for(**flash, longlora={"s2_attn": False}))  # full attention: Axolotl's choice
    load(cfg_for(attn_implementation="sdpa"))


@pytest.mark.parametrize("value", [True, "auto"])
def test_s2_with_torch_compile_is_refused(cfg_for, value):
    """``torch_compile`` (``auto`` becomes ``true`` on torch >= 2.5.1) has Axolotl compile
    the model with Inductor under ``suppress_errors``; S2's layout reads ``position_ids``
    on the host (graph breaks) and the compiled S2 step has not run: refused at
    ``register``, before the model loads, naming the key, the value and the ways out.
    Full attention with torch_compile stays Axolotl's business."""
    message = assert_error(
        cfg_for(torch_compile=value),
        f"torch_compile={value!r} with longlora.s2_attn: true",
        "suppress_errors",
        "Remove torch_compile",
        "or set longlora.s2_attn: false",
    )
    assert "position_ids" in message
    assert load(cfg_for(torch_compile=value, longlora={"s2_attn": False})).torch_compile is True
    assert not load(cfg_for(torch_compile=False)).torch_compile
