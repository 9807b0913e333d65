"""Sharded training with the plugin on two CPU ranks: DDP, DeepSpeed ZeRO-2 and ZeRO-3
through ``axolotl train``, and FSDP2 through ``torch.distributed.fsdp.fully_shard`` with
the plugin's public functions (``tests/support/fsdp2_train.py``: accelerate, under both
Axolotl and the HF Trainer, never picks FSDP for CPU processes). Two models: an untied
Llama, and a Qwen2 with tied embeddings. Every run: LoRA plus embeddings and norms trained
in full, S2-Attn on, RoPE interpolation (linear x4).

Every rank loads its own model, so every rank must apply S2-Attn, the RoPE and the
trainable modules itself; a probe (``tests/support/rank_probe_plugin.py``, or the FSDP2
script itself) records each rank, and ``tests/support/cpu_ranks_plugin.py`` holds what
``axolotl train`` needs on CPU processes (and why). Nothing may be lost: the saved adapter
holds the full trained embedding and norm tensors (gathered under ZeRO-3 and FSDP2), tied
weights stay tied after loading, a run killed after a checkpoint resumes to the same
weights as an uninterrupted one, and ``axolotl merge-lora`` of a ZeRO-3 run gives the
adapter's logits. ZeRO-2 and ZeRO-3 of one model train the same weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.support.ranks import (
    ZERO,
    axolotl,
    environment,
    fsdp2_train,
    lora_config,
    probe_records,
    train_two_ranks,
    write_config,
)
from tests.support.tiny_models import build_tiny_model, write_text_dataset

pytest.importorskip("deepspeed")

ARCHS = {"llama": {}, "qwen2": {"tie_word_embeddings": True}}
STEPS = 4
# Packed rows in dataset order: Axolotl 0.21 does not replay a shuffled packing order on
# resume (docs/configs.md), and the resume test compares with an uninterrupted run.
SCHEDULE = {
    "max_steps": STEPS,
    "save_strategy": "steps",
    "save_steps": 2,
    "lr_scheduler": "cosine",
    "warmup_steps": 1,
    "curriculum_sampling": True,
    "sample_packing_sequentially": True,
}
CP2 = {"context_parallel": 2}
ACCUMULATE = {"gradient_accumulation_steps": 2}
RUNS = {
    "ddp-llama": ("llama", {}),
    "zero2-llama": ("llama", {"deepspeed": ZERO[2], **SCHEDULE}),
    "zero2-qwen2": ("qwen2", {"deepspeed": ZERO[2], **SCHEDULE}),
    "zero3-llama": ("llama", {"deepspeed": ZERO[3], **SCHEDULE}),
    "zero3-qwen2": ("qwen2", {"deepspeed": ZERO[3], **SCHEDULE}),
    # S2-Attn context parallelism: each 256-token row split over the 2 ranks
    "ddp-cp2-llama": ("llama", {"longlora": CP2}),
    # ZeRO-3 with gradient accumulation (what the stock 70B config runs), split and whole
    "zero3-ga2-llama": ("llama", {"deepspeed": ZERO[3], **ACCUMULATE}),
    "zero3-ga2-cp2-llama": ("llama", {"deepspeed": ZERO[3], **ACCUMULATE, "longlora": CP2}),
    # tests/support/fsdp2_train.py: the same schedule (4 steps, checkpoint at 2, cosine)
    "fsdp2-llama": ("llama", {"max_steps": STEPS}),
    "fsdp2-qwen2": ("qwen2", {"max_steps": STEPS}),
}
TIED = ["zero2-qwen2", "zero3-qwen2", "fsdp2-qwen2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharding")


@pytest.fixture(scope="module")
def bases(work) -> dict[str, Path]:
    return {
        arch: build_tiny_model(work / f"base-{arch}", arch=arch, **kw) for arch, kw in ARCHS.items()
    }


@pytest.fixture(scope="module")
def dataset(work) -> Path:
    return write_text_dataset(work / "data.jsonl")


class Runs:
    """Each run trained once, on first use."""

    def __init__(self, work: Path, bases: dict[str, Path], dataset: Path):
        self.work, self.bases, self.dataset = work, bases, dataset
        self.done: dict[str, tuple[Path, str]] = {}

    def config(self, name: str) -> Path:
        arch, extra = RUNS[name]
        run_dir = self.work / name
        run_dir.mkdir(exist_ok=True)
        return write_config(
            run_dir / "cfg.yml", lora_config(self.bases[arch], self.dataset, run_dir, **extra)
        )

    def get(self, name: str) -> tuple[Path, str]:
        """(output_dir, training log) of ``name``."""
        if name not in self.done and name.startswith("fsdp2"):
            out = self.work / name / "out"
            log = fsdp2_train(self.bases[RUNS[name][0]], self.dataset, out).stdout
            self.done[name] = (out, log)
        if name not in self.done:
            cfg_path = self.config(name)
            env = {"ACCELERATE_USE_CPU": "true"} if name.startswith("ddp") else {}
            log = train_two_ranks(cfg_path, **env)
            self.done[name] = (cfg_path.parent / "out", log)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(work, bases, dataset) -> Runs:
    return Runs(work, bases, dataset)


def _mode(name: str) -> str:
    return "MULTI_CPU" if name.startswith("ddp") else "DEEPSPEED"


@pytest.mark.parametrize("name", list(RUNS))
def test_every_rank_trains_with_s2_rope_and_trainable_modules(runs, name):
    out, log = runs.get(name)
    records = probe_records(out)
    assert [r["rank"] for r in records] == [0, 1], records
    for record in records:
        assert record["world_size"] == 2
        if not name.startswith("fsdp2"):  # Axolotl's Trainer and accelerate state
            assert record["args_world_size"] == 2
            assert record["accelerate"].endswith(_mode(name)), record["accelerate"]
            assert "DISTRIBUTED" in record["parallel_mode"]
        split = RUNS[name][1].get("longlora", {}).get("context_parallel", 1)
        suffix = f"_cp{split}" if split > 1 else ""
        assert record["attn_implementation"] == "longlora_s2_sdpa_g64" + suffix
        assert record["rope_parameters"]["rope_type"] == "linear"
        assert record["rope_parameters"]["factor"] == 4.0
        assert record["trainable_embed"] and len(record["trainable_norm"]) == 2 * 2 + 1
        assert record["trainable_lora"] == 2 * 4 * 2  # 2 layers x q/k/v/o x (A, B)
        assert record["steps"] == RUNS[name][1].get("max_steps", 3)
    # the ranks kept the trained embeddings and norms in sync
    assert records[0]["trained_digests"] == records[1]["trained_digests"]
    if name.startswith("fsdp2"):
        return  # no Axolotl log
    assert "longlora: S2-Attn on 2 attention layers, group size 64, shift 32" in log


def _adapter_key(trained_name: str) -> str:
    return trained_name.replace(".modules_to_save.default", "")


@pytest.mark.parametrize("name", list(RUNS))
def test_adapter_holds_the_full_trained_embedding_and_norms(runs, bases, name):
    out, _ = runs.get(name)
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["rope_parameters"]["factor"] == 4.0  # what merge and eval load
    adapter = load_file(str(out / "adapter_model.safetensors"))
    trained = load_file(str(out / "rank_probe" / "trained_modules_to_save.safetensors"))
    base = load_file(str(bases[RUNS[name][0]] / "model.safetensors"))
    assert len(trained) == 1 + 2 * 2 + 1  # embed_tokens (also the tied head), the norms
    for name_, tensor in trained.items():
        saved = adapter[_adapter_key(name_)]
        original = base[_adapter_key(name_).removeprefix("base_model.model.")]
        assert saved.shape == original.shape and saved.numel() > 0, name_
        assert torch.equal(saved, tensor), name_
        assert not torch.equal(saved, original), f"{name_} is the base weight"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_zero3_trains_the_same_weights_as_zero2(runs, arch):
    """The same rows, seed and schedule: partitioning parameters (ZeRO-3) must not change
    what is learnt, including the gradient a tied LM head adds to the embedding."""
    zero2 = load_file(str(runs.get(f"zero2-{arch}")[0] / "adapter_model.safetensors"))
    zero3 = load_file(str(runs.get(f"zero3-{arch}")[0] / "adapter_model.safetensors"))
    assert zero2.keys() == zero3.keys()
    # fp32; only the order of the gradient reductions differs (seen: <= 2e-7), while the
    # four Adam steps at lr 1e-3 move each weight by up to ~4e-3
    worst = max((zero2[k] - zero3[k]).abs().max().item() for k in zero2)
    assert worst <= 1e-6, worst


def test_each_zero_stage_keeps_its_share_on_each_rank(runs):
    """Bytes rank 0 holds (the probe reads them at the first optimizer step): ZeRO-2
    splits gradients and Adam moments over the 2 ranks, ZeRO-3 the parameters too, the
    full-trained embedding and norm copies included (DeepSpeed issue #7669 reports
    ``modules_to_save`` left whole under ZeRO-3)."""
    ddp, zero2, zero3 = (
        probe_records(runs.get(name)[0])[0]["memory"]
        for name in ("ddp-llama", "zero2-llama", "zero3-llama")
    )
    assert zero2["parameters"] == ddp["parameters"]
    assert 0.45 <= zero2["moments"] / ddp["moments"] <= 0.55
    assert 0.45 <= zero2["gradients"] / ddp["gradients"] <= 0.55
    # (ZeRO-3 steps its optimizer once per parameter group, so the probe's first-step
    # hooks see only part of its state: only its parameters are compared)
    assert 0.45 <= zero3["parameters"] / ddp["parameters"] <= 0.55


def test_tied_embeddings_stay_tied_after_save_and_load(runs, bases):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in TIED:
        out, _ = runs.get(name)
        adapter = load_file(str(out / "adapter_model.safetensors"))
        assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"]
        head_key, embed_key = (
            "base_model.model.lm_head.weight",
            "base_model.model.model.embed_tokens.weight",
        )
        if head_key in adapter:  # PEFT may save the tied copy too: it must be the same
            assert torch.equal(adapter[head_key], adapter[embed_key])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["qwen2"]), out)
        inner = model.get_base_model()
        embed = inner.get_input_embeddings().weight
        head = inner.get_output_embeddings().weight
        assert head.data_ptr() == embed.data_ptr()  # one tensor, not two equal copies
        assert torch.equal(embed, adapter[embed_key])


@pytest.fixture(scope="module")
def resumed(runs, work):
    """zero3-llama killed right after its step-2 checkpoint, then resumed from it."""
    cfg_path = runs.config("zero3-llama")
    resumed_dir = work / "zero3-llama-resumed"
    resumed_dir.mkdir()
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["output_dir"] = str(resumed_dir / "out")
    cfg_killed = write_config(resumed_dir / "cfg.yml", cfg)
    # the real torch.distributed.run, as a user's --launcher torchrun (it stops the other
    # rank when one dies); the other runs fork from tests/support/prefork.py
    killed = axolotl(
        "train",
        cfg_killed,
        ranks=2,
        env=environment(LONGLORA_PROBE_KILL_AFTER_SAVE="2"),
        check=False,
        launcher="torchrun",
    )
    assert killed.returncode != 0 and (resumed_dir / "out" / "checkpoint-2").is_dir()
    assert not (resumed_dir / "out" / "checkpoint-4").exists()
    cfg["resume_from_checkpoint"] = str(resumed_dir / "out" / "checkpoint-2")
    resume_cfg = write_config(resumed_dir / "cfg-resume.yml", cfg)
    log = axolotl("train", resume_cfg, ranks=2, launcher="torchrun").stdout
    return resumed_dir / "out", log


@pytest.mark.parametrize("parallel", ["ddp", "zero3-ga2"])
def test_rows_split_over_ranks_train_what_whole_rows_train(runs, parallel):
    """``longlora.context_parallel: 2``: each rank runs both ranks' rows, one
    128-token chunk of each (its forward passes show it), exchanging only S2 halos; the
    result is the data-parallel run on whole rows: the same logged losses, and adapters
    equal up to summation order (the runs without splitting, DDP and ZeRO-3, differ
    from each other by as much: seen 3.7e-6 on embedding rows whose tiny gradients Adam
    scales up; LoRA weights <= 8e-7; 3 Adam steps at lr 1e-3 move weights by ~3e-3)."""
    whole, whole_log = runs.get(f"{parallel}-llama")
    split, log = runs.get(f"{parallel}-cp2-llama")
    accumulate = RUNS[f"{parallel}-llama"][1].get("gradient_accumulation_steps", 1)
    assert "longlora: S2-Attn context parallelism: each row split over 2 processes" in log
    assert [r["forward_lengths"] for r in probe_records(whole)] == [[256] * accumulate] * 2
    chunks = [[128, 128] * accumulate] * 2
    assert [r["forward_lengths"] for r in probe_records(split)] == chunks
    steps = RUNS[f"{parallel}-llama"][1].get("max_steps", 3)
    assert _losses(log) == _losses(whole_log) and len(_losses(log)) == steps
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(split / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    lora = max((a[k] - b[k]).abs().max().item() for k in a if "lora_" in k)
    assert lora <= 2e-6, lora


def _losses(log: str) -> list[str]:
    """The training losses Axolotl logged (rank 0, as printed)."""
    return re.findall(r"'loss': '?([0-9.]+)", log)


def _log_history(out: Path) -> dict[int, dict]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}


def test_resume_continues_step_optimizer_schedule_and_patches(runs, resumed):
    out_full, _ = runs.get("zero3-llama")
    out_resumed, log = resumed
    records = probe_records(out_resumed)
    assert [r["first_step"] for r in records] == [3, 3]  # it went on from step 2
    assert all(r["attn_implementation"] == "longlora_s2_sdpa_g64" for r in records)
    assert all(r["rope_parameters"]["factor"] == 4.0 for r in records)
    assert "longlora: RoPE linear factor 4.0 (original 64, target 256)" in log
    full, again = _log_history(out_full), _log_history(out_resumed)
    assert sorted(again) == [1, 2, 3, 4]  # steps 1-2 from the killed run's checkpoint
    for step in (3, 4):  # the cosine schedule continued, and so did the loss
        assert again[step]["learning_rate"] == full[step]["learning_rate"]
        assert abs(again[step]["loss"] - full[step]["loss"]) < 1e-4
    a = load_file(str(out_full / "adapter_model.safetensors"))
    b = load_file(str(out_resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # fp32 on CPU, the same data order and seeded LoRA init: only the order of floating
    # point reductions can differ between the runs
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_fsdp2_resume_from_sharded_checkpoint_matches_uninterrupted_run(runs, bases, dataset, work):
    """FSDP2: killed after the DCP checkpoint of step 2, resumed from it on a fresh
    process group; model shards, AdamW moments and the cosine schedule all come back."""
    out_full, _ = runs.get("fsdp2-llama")
    out = work / "fsdp2-llama-resumed" / "out"
    killed = fsdp2_train(bases["llama"], dataset, out, "--kill-after-save", "2", check=False)
    assert killed.returncode != 0 and (out / "checkpoint-2").is_dir()
    assert not (out / "adapter_model.safetensors").exists()
    fsdp2_train(bases["llama"], dataset, out, "--resume", str(out / "checkpoint-2"))
    records, full = probe_records(out), probe_records(out_full)[0]
    assert [r["first_step"] for r in records] == [3, 3]
    assert all(r["attn_implementation"] == "longlora_s2_sdpa_g64" for r in records)
    assert all(r["rope_parameters"]["factor"] == 4.0 for r in records)
    for step in ("3", "4"):
        assert records[0]["learning_rates"][step] == full["learning_rates"][step]
        assert abs(records[0]["losses"][step] - full["losses"][step]) < 1e-5
    a = load_file(str(out_full / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # the same fp32 arithmetic in the same order (gloo reduces in a fixed order):
    # a restart that lost the moments or the schedule would move the weights by ~lr
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_merge_after_zero3_matches_the_adapter(runs, bases):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    out, _ = runs.get("zero3-llama")
    # one process, as on a GPU machine (the CPU shim for it: tests/support/cpu_ranks_plugin.py)
    axolotl("merge_lora", runs.config("zero3-llama"))
    merged_dir = out / "merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "rope_theta": 10000.0,
    }
    trained = AutoConfig.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(bases["llama"], config=trained, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, trained.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (adapter(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()
    assert difference.item() <= 1e-5
