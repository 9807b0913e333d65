"""Axolotl's memory features next to the plugin, each through a real ``axolotl train``
(one CPU process): the ones that run on a CPU must keep S2-Attn on, the RoPE
interpolation, and the embeddings and norms trained and saved in full, and train to the
losses of the same run without the feature.

On the CPU legs (seen 2026-12-03 on both): ``chunked_cross_entropy``, ``tiled_mlp`` and
QLoRA (``load_in_4bit``, bitsandbytes' CPU backend) run; ``activation_offloading`` needs
CUDA streams, Liger and Cut Cross Entropy need Triton on a GPU (docs/configs.md, "Axolotl's
memory features").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.ranks import axolotl_together, lora_config, probe_records, write_config
from tests.support.tiny_models import build_tiny_model, write_text_dataset
from tests.support.versions import AXOLOTL_021

PLUGINS = ["longlora_plugin.LongLoRAPlugin", "tests.support.rank_probe_plugin.RankProbePlugin"]
STEPS = 3
FEATURES: dict[str, dict] = {
    "plain": {},
    "chunked_cross_entropy": {"chunked_cross_entropy": True},
    "tiled_mlp": {"tiled_mlp": True},
    "qlora": {"adapter": "qlora", "load_in_4bit": True},
    # not a memory feature: Axolotl's per-group learning rate, which reaches the norms
    "embedding_lr_scale": {"embedding_lr_scale": 0.1},
}
# Relative distance of each step's loss from the run without the feature. Chunking and
# tiling change only the order of fp32 sums. Axolotl 0.21's chunked loss reads 0.41% lower
# than its plain loss already at step 1, before any update, with or without this plugin
# (seen 2026-12-03: 6.513 vs 6.540 with no plugin, 6.558 vs 6.585 with it): its own
# normalisation, so 1% there. 4-bit base weights move the loss by ~0.2% (seen: 6.580 vs
# 6.585 at step 1).
TOLERANCE = {
    "chunked_cross_entropy": 1e-2 if AXOLOTL_021 else 1e-4,
    "tiled_mlp": 1e-4,
    "qlora": 1e-2,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """output_dir of each run: the same tiny Llama, rows, seed and schedule."""
    work = tmp_path_factory.mktemp("memory-features")
    base = build_tiny_model(work / "base", arch="llama")
    dataset = write_text_dataset(work / "data.jsonl")
    configs = []
    for name, extra in FEATURES.items():
        run_dir = work / name
        run_dir.mkdir()
        cfg = lora_config(base, dataset, run_dir, save_strategy="steps", save_steps=STEPS)
        cfg.update({"plugins": PLUGINS, **extra})
        configs.append(write_config(run_dir / "cfg.yml", cfg))
    axolotl_together("train", configs)
    return {name: work / name / "out" for name in FEATURES}


def _losses(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_feature_trains_with_s2_rope_and_full_embedding_and_norms(runs, name):
    (record,) = probe_records(runs[name])
    assert record["attn_implementation"] == "longlora_s2_sdpa_g64"
    assert record["rope_parameters"]["factor"] == 4.0
    assert record["trainable_embed"] and len(record["trainable_norm"]) == 2 * 2 + 1
    assert record["trainable_lora"] == 2 * 4 * 2  # 2 layers x q/k/v/o x (A, B)
    plain = probe_records(runs["plain"])[0]
    # the feature is on: its loss, MLP or 4-bit layers replace the model's own
    changed = {
        "chunked_cross_entropy": "loss_function",
        "tiled_mlp": "mlp_forward",
        "qlora": "linear_4bit",
    }[name]
    assert record[changed] != plain[changed], (changed, record[changed])
    saved = load_file(str(runs[name] / "adapter_model.safetensors"))
    base = load_file(str(runs["plain"].parents[1] / "base" / "model.safetensors"))
    kept = [k for k in saved if "lora_" not in k]
    assert len(kept) == 1 + 2 * 2 + 1, kept  # embed_tokens and the five norms, in full
    for key in kept:
        original = base[key.removeprefix("base_model.model.")]
        assert saved[key].shape == original.shape
        assert not torch.equal(saved[key], original), f"{key} not trained"
    losses, reference = _losses(runs[name]), _losses(runs["plain"])
    assert len(losses) == len(reference) == STEPS
    for ours, theirs in zip(losses, reference, strict=True):
        assert ours == pytest.approx(theirs, rel=TOLERANCE[name]), (losses, reference)


def test_liger_norms_are_the_trainable_norms(tiny_llama, monkeypatch):
    """Liger (GPU only: Triton kernels) swaps Llama's RMSNorm, MLP and RoPE classes at
    ``pre_model_load``, after the plugin derived the ``modules_to_save`` names at
    ``register``. The names must still be those of the norms, and the modules behind them
    Liger's norms (what a CPU can show: the class swap; the kernels run on a GPU)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from longlora_plugin.trainable import find_trainable_modules

    config = AutoConfig.from_pretrained(tiny_llama)
    before = find_trainable_modules(config, ["embed", "norm"])
    for name, value in vars(modeling_llama).copy().items():  # undone after the test
        monkeypatch.setattr(modeling_llama, name, value)
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    assert modeling_llama.LlamaRMSNorm is LigerRMSNorm
    model = AutoModelForCausalLM.from_config(config)
    after = find_trainable_modules(config, ["embed", "norm"], model=model)
    assert after.names == before.names and after.by_kind["norm"]
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert len(norms) == 2 * 2 + 1 and all(isinstance(m, LigerRMSNorm) for m in norms)


def test_embedding_lr_scale_reaches_the_norms_and_the_plugin_says_so(runs):
    """Axolotl gives ``embedding_lr_scale`` to every ``modules_to_save`` weight, so the
    norms the plugin trains in full get it too; the plugin's warning says so."""
    (record,) = probe_records(runs["embedding_lr_scale"])
    lrs = record["initial_lr"]
    assert lrs["lora"] and lrs["embed"] and lrs["norm"], lrs
    (lora,) = lrs["lora"]
    assert lrs["embed"] == lrs["norm"] == [pytest.approx(0.1 * lora)]
    assert probe_records(runs["plain"])[0]["initial_lr"]["norm"] == [pytest.approx(lora)]
    log = (runs["embedding_lr_scale"].parent / "cfg.train.log").read_text(errors="replace")
    assert "longlora: embedding_lr_scale=0.1 also applies to the norms" in log
