"""Real ``axolotl train`` / ``axolotl merge-lora`` runs with the LongLoRA plugin (CPU).

Each run is a process of its own (``python -m axolotl.cli.train cfg.yml``, forked from
the tests' prefork server, which has imported Axolotl): Axolotl patches transformers
globally and keeps plugin singletons, and 0.19's merge-lora is meant to run once per
process, so separate processes are the robust choice. The runs start together when the
module's first test needs them (2 cores: they overlap the dataset preparation each one
spends single-threaded) and every run uses ``OMP_NUM_THREADS=1`` (~10x faster steps on a tiny model than the default threads).

Runs (tiny models: hidden 64, 2 layers, pre-training context 64; sequence_len 256):

* ``llama_lora_packed_s2``  - Llama, LoRA, sample packing, S2-Attn (ratio 0.25 -> G 64),
  RoPE linear auto (factor 4), the opt-in ``longlora.eval`` at the end of training; then
  ``axolotl merge-lora``; then ``longlora eval`` on its adapter and merged directories.
* ``llama_lora_packed_full`` - the same with ``s2_attn: false`` (S2 must change training).
* ``qwen2_tied_lora_s2`` - Qwen2 with tied embeddings, LoRA, no packing, S2-Attn,
  ``trainable_params: [embed, norm, lm_head]``; then ``axolotl merge-lora`` with the
  config switched to ``attn_implementation: flash_attention_2`` (no flash-attn here).
* ``mistral_full_s2`` - Mistral, full fine-tune, no packing, gradient checkpointing,
  S2-Attn with ``group_size: 32``, RoPE yarn.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from longlora_plugin.offline import OFFLINE_ENV
from tests.support import prefork
from tests.support.tiny_models import (
    LORA_R4,
    TRAIN_SHORT,
    build_tiny_model,
    write_text_dataset,
)
from tests.support.versions import AXOLOTL_021

SEQUENCE_LEN = 256
RUN_TIMEOUT_S = 900
# LoRA runs that are also merged: run name -> base model.
LORA_RUNS = {"llama_lora_packed_s2": "llama", "qwen2_tied_lora_s2": "qwen2_tied"}
# Merged from a copy of the config that says attn_implementation: flash_attention_2, as a
# GPU config does: merging runs no attention kernel, so it must work without flash-attn.
MERGE_AS_FLASH = ("qwen2_tied_lora_s2",)

COMMON: dict[str, Any] = {
    "plugins": ["longlora_plugin.LongLoRAPlugin"],
    "sequence_len": SEQUENCE_LEN,
    **TRAIN_SHORT,
    "micro_batch_size": 2,
}
LORA = LORA_R4
# A checkpoint at the last step keeps trainer_state.json, whose log_history has the
# unrounded losses (the console shows 4 digits).
CHECKPOINT: dict[str, Any] = {"save_strategy": "steps", "save_steps": COMMON["max_steps"]}
# longlora.eval for llama_lora_packed_s2 (``data`` is filled in with the run's dataset).
EVAL_BLOCK: dict[str, Any] = {
    "ppl_lengths": [64, 128, 256],  # no document reaches 256 tokens: sliding-window has none
    "max_windows": 2,
    "passkey_lengths": [256],
    "passkey_depths": [0.5],
    "passkey_trials": 2,
    "every_n_steps": 1,  # and during training, at 64 and 256 tokens
}
RUNS: dict[str, dict[str, Any]] = {
    "llama_lora_packed_s2": {
        "arch": "llama",
        # the module path spelling: on Axolotl 0.21 the entry point registers the plugin
        # as longlora_plugin.LongLoRAPlugin too, and it must still run once
        "cfg": {
            **LORA,
            **CHECKPOINT,
            "sample_packing": True,
            "longlora": {},
            "plugins": ["longlora_plugin.axolotl.plugin_hooks.LongLoRAPlugin"],
        },
        "eval": EVAL_BLOCK,
    },
    # llama_lora_packed_s2 without longlora.eval: the same training
    "llama_lora_packed_s2_no_eval": {
        "arch": "llama",
        "cfg": {**LORA, **CHECKPOINT, "sample_packing": True, "longlora": {}},
    },
    "llama_lora_packed_full": {
        "arch": "llama",
        "cfg": {**LORA, **CHECKPOINT, "sample_packing": True, "longlora": {"s2_attn": False}},
    },
    # the paper's short-attention ablation (longlora.shift: false)
    "llama_lora_packed_short": {
        "arch": "llama",
        "cfg": {**LORA, **CHECKPOINT, "sample_packing": True, "longlora": {"shift": False}},
    },
    "qwen2_tied_lora_s2": {
        "arch": "qwen2_tied",
        "cfg": {
            **LORA,
            "sample_packing": False,
            "longlora": {"trainable_params": ["embed", "norm", "lm_head"]},
        },
    },
    "mistral_full_s2": {
        "arch": "mistral",
        "cfg": {
            "sample_packing": False,
            "gradient_checkpointing": True,
            "longlora": {"group_size": 32, "rope": {"type": "yarn"}},
        },
    },
}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


@dataclass
class AxolotlRun:
    """One ``python -m axolotl.cli.<module> cfg.yml`` process with its config, output dir
    and log file, forked from the tests' prefork server (``tests/support/prefork.py``:
    Axolotl already imported); several run at once."""

    name: str
    cfg_path: Path
    out_dir: Path
    log_path: Path
    launch: int
    started: float
    returncode: int | None = None
    seconds: float | None = None

    @classmethod
    def start(cls, name: str, module: str, cfg_path: Path, out_dir: Path) -> AxolotlRun:
        log_path = cfg_path.parent / f"{name}.{module.rsplit('.', 1)[-1]}.log"
        launch = prefork.Server.get(subprocess_env()).start(
            module,
            [str(cfg_path)],
            ranks=1,
            env=subprocess_env(),
            cwd=cfg_path.parent,
            log=log_path,
            timeout=RUN_TIMEOUT_S,
        )
        return cls(name, cfg_path, out_dir, log_path, launch, time.time())

    def log(self) -> str:
        """Wait for the process; assert it succeeded; return its combined output."""
        if self.returncode is None:
            done = prefork.Server.get(subprocess_env()).wait(self.launch)
            self.returncode = done["returncode"]
            self.seconds = self.log_path.stat().st_mtime - self.started  # ~ the process end
            print(f"[timing] {self.log_path.name}: {self.seconds:.1f} s", file=sys.stderr)
            if done.get("timed_out"):
                raise subprocess.TimeoutExpired(self.name, RUN_TIMEOUT_S)
        text = self.log_path.read_text(errors="replace")
        assert self.returncode == 0, (
            f"{self.name} failed (rc={self.returncode}); log tail:\n{text[-8000:]}"
        )
        return text

    def stop(self) -> None:
        if self.returncode is None:
            self.returncode = prefork.Server.get(subprocess_env()).kill(self.launch)["returncode"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("axolotl-runs")


@pytest.fixture(scope="module")
def base_models(workdir: Path) -> dict[str, Path]:
    return {
        "llama": build_tiny_model(workdir / "base-llama", arch="llama"),
        "mistral": build_tiny_model(workdir / "base-mistral", arch="mistral"),
        "qwen2_tied": build_tiny_model(
            workdir / "base-qwen2-tied", arch="qwen2", tie_word_embeddings=True
        ),
    }


@pytest.fixture(scope="module")
def runs(workdir: Path, base_models: dict[str, Path]):
    """Start every training run at once; tests wait on the one they inspect."""
    dataset = write_text_dataset(workdir / "data.jsonl")
    started: dict[str, AxolotlRun] = {}
    try:
        for name, spec in RUNS.items():
            run_dir = workdir / name
            run_dir.mkdir()
            cfg = {
                **COMMON,
                **spec["cfg"],
                "base_model": str(base_models[spec["arch"]]),
                "datasets": [{"path": str(dataset), "ds_type": "json", "type": "completion"}],
                "dataset_prepared_path": str(run_dir / "prepared"),
                "output_dir": str(run_dir / "out"),
            }
            if "eval" in spec:
                cfg["longlora"] = {
                    **cfg["longlora"],
                    "eval": {**spec["eval"], "data": str(dataset)},
                }
            cfg_path = run_dir / "cfg.yml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            started[name] = AxolotlRun.start(name, "axolotl.cli.train", cfg_path, run_dir / "out")
        yield started
    finally:
        for run in started.values():
            run.stop()


@pytest.fixture(scope="module")
def merged(runs: dict[str, AxolotlRun]) -> dict[str, Path]:
    """``axolotl merge-lora`` on every LoRA run (started together once their training
    is done); maps run name -> ``output_dir/merged``."""
    merging: dict[str, AxolotlRun] = {}
    try:
        for name in LORA_RUNS:
            trained = runs[name]
            trained.log()
            cfg_path = trained.cfg_path
            if name in MERGE_AS_FLASH:
                cfg = yaml.safe_load(cfg_path.read_text())
                cfg_path = cfg_path.with_name("merge-flash.yml")
                cfg_path.write_text(
                    yaml.safe_dump({**cfg, "attn_implementation": "flash_attention_2"})
                )
            merging[name] = AxolotlRun.start(
                name, "axolotl.cli.merge_lora", cfg_path, trained.out_dir
            )
        for run in merging.values():
            run.log()
    finally:
        for run in merging.values():
            run.stop()
    return {name: runs[name].out_dir / "merged" for name in LORA_RUNS}


def _log_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"longlora: (S2-Attn|RoPE) [^\n]*", text)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "llama_lora_packed_s2",
            [
                "longlora: S2-Attn on 2 attention layers, group size 64, shift 32",
                "longlora: RoPE linear factor 4.0 (original 64, target 256)",
            ],
        ),
        ("llama_lora_packed_full", ["longlora: RoPE linear factor 4.0 (original 64, target 256)"]),
        (
            "llama_lora_packed_short",
            [
                "longlora: S2-Attn on 2 attention layers, group size 64, shift 0 (longlora.shift:"
                " false, short attention: an ablation)",
                "longlora: RoPE linear factor 4.0 (original 64, target 256)",
            ],
        ),
        (
            "qwen2_tied_lora_s2",
            [
                "longlora: S2-Attn on 2 attention layers, group size 64, shift 32",
                "longlora: RoPE linear factor 4.0 (original 64, target 256)",
            ],
        ),
        (
            "mistral_full_s2",
            [
                "longlora: S2-Attn on 2 attention layers, group size 32, shift 16",
                "longlora: RoPE yarn factor 4.0 (original 64, target 256)",
            ],
        ),
    ],
)
def test_log_lines(runs, name, expected):
    text = runs[name].log()
    lines = [line for line in _log_lines(text) if not line.startswith("longlora: S2-Attn off")]
    assert lines == expected, text[-4000:]
    debug_log = (runs[name].out_dir / "debug.log").read_text()
    for line in expected:
        assert debug_log.count(line) == 1, f"{line!r} not once in debug.log"


@pytest.mark.parametrize(("name", "arch"), LORA_RUNS.items())
def test_adapter_holds_embedding_and_every_norm(runs, base_models, name, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from longlora_plugin.trainable import is_norm_module

    out = runs[name].out_dir
    runs[name].log()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_models[arch])
    norms = [n for n, module in base.named_modules() if is_norm_module(module)]
    assert len(norms) == 2 * 2 + 1  # two per layer plus the final norm
    base_state = base.state_dict()
    for module in ["model.embed_tokens", *norms]:
        key = f"base_model.model.{module}.weight"
        assert key in adapter, f"{key} missing; adapter keys: {sorted(adapter)}"
        assert not torch.equal(adapter[key], base_state[f"{module}.weight"]), (
            f"{module} not trained"
        )
    assert any("lora_A" in k for k in adapter)
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    if arch == "qwen2_tied":
        # lm_head was requested but is the embedding: trained through embed_tokens, and
        # PEFT's ensure_weight_tying keeps its copy identical.
        assert adapter_config["ensure_weight_tying"] is True
        head = adapter.get("base_model.model.lm_head.weight")
        if head is not None:
            assert torch.equal(head, adapter["base_model.model.model.embed_tokens.weight"])
    else:
        assert "base_model.model.lm_head.weight" not in adapter


@pytest.mark.parametrize(
    ("name", "rope"),
    [
        ("llama_lora_packed_s2", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
        (
            "mistral_full_s2",
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        ),
    ],
)
def test_saved_config_carries_rope(runs, name, rope):
    runs[name].log()
    saved = json.loads((runs[name].out_dir / "config.json").read_text())
    assert saved["rope_parameters"] == rope
    assert saved["max_position_embeddings"] == SEQUENCE_LEN


def test_full_finetune_saves_full_model(runs):
    from transformers import AutoModelForCausalLM

    out = runs["mistral_full_s2"].out_dir
    runs["mistral_full_s2"].log()
    assert not (out / "adapter_model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize(("name", "arch"), LORA_RUNS.items())
def test_merged_model_matches_peft_model(merged, runs, base_models, name, arch):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    merged_dir = merged[name]
    out = runs[name].out_dir
    # 0.21's merge-lora calls post_lora_merge, which patches the merged config.json; 0.19
    # has no hook after the merge, so the plugin merges from a staged base directory.
    merge_log = (runs[name].cfg_path.parent / f"{name}.merge_lora.log").read_text()
    staged = (out / ".longlora_merge_base").is_dir()
    if AXOLOTL_021:
        assert not staged and f"into {merged_dir / 'config.json'}" in merge_log
    else:
        assert staged and "longlora: merge-lora: using" in merge_log
    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert merged_config["rope_parameters"] == {
        "rope_type": "linear",
        "factor": 4.0,
        "rope_theta": 10000.0,
    }
    assert merged_config["max_position_embeddings"] == SEQUENCE_LEN
    trained_config = AutoConfig.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(
        base_models[arch], config=trained_config, dtype=torch.float32
    )
    peft_model = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config._attn_implementation == "sdpa"
    # 200 tokens: far beyond the base model's 64-token context.
    ids = torch.randint(
        3, trained_config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert (peft_logits - merged_logits).abs().max().item() <= 1e-5

    # Power check: the same merged weights without the RoPE interpolation differ clearly.
    unscaled = AutoModelForCausalLM.from_pretrained(
        merged_dir,
        dtype=torch.float32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ).eval()
    with torch.no_grad():
        assert (unscaled(input_ids=ids).logits - merged_logits).abs().max().item() > 1e-3


def _losses(run: AxolotlRun) -> list[float]:
    run.log()
    (state,) = run.out_dir.glob("checkpoint-*/trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_s2_attn_changes_training(runs):
    """The first step's loss is computed before any update and, with LoRA's B = 0, does
    not depend on the (unseeded) LoRA A init: with identical data and weights it can
    only differ through the attention. sequence_len 256 > G = 64, so S2 must change it."""
    with_s2 = runs["llama_lora_packed_s2"]
    without = runs["llama_lora_packed_full"]
    assert "longlora: S2-Attn on" in with_s2.log()
    assert "longlora: S2-Attn off (longlora.s2_attn: false)" in without.log()
    s2_losses, full_losses = _losses(with_s2), _losses(without)
    assert len(s2_losses) == len(full_losses) == COMMON["max_steps"]
    assert abs(s2_losses[0] - full_losses[0]) > 1e-4, (s2_losses, full_losses)
    short_losses = _losses(runs["llama_lora_packed_short"])  # no shifted half: other groups
    assert len(short_losses) == COMMON["max_steps"]
    # the shifted half is half the heads on this random model: 4.9e-5 measured, fp32 noise
    # on a loss of 6.5 is ~1e-6
    assert abs(short_losses[0] - s2_losses[0]) > 1e-5, (short_losses, s2_losses)
    assert abs(short_losses[0] - full_losses[0]) > 1e-4, (short_losses, full_losses)


def test_end_of_training_eval_runs_once_with_full_attention(runs):
    run = runs["llama_lora_packed_s2"]
    text = run.log()
    eval_dir = run.out_dir / "longlora_eval"
    for name in ("ppl.json", "ppl.md", "ppl.png", "passkey.json", "passkey.md", "passkey.png"):
        assert (eval_dir / name).is_file(), name
    # (debug.log is rewritten by the later merge-lora run: read the training output)
    assert text.count("longlora: eval (full attention) into") == 1
    assert text.count("longlora: S2-Attn on") == text.count("S2-Attn off (full attention") == 1
    assert "Perplexity, window-mean convention" in text
    ppl = json.loads((eval_dir / "ppl.json").read_text())
    (model,) = ppl["models"]
    assert model["attn_implementation"] == "sdpa"  # S2-Attn switched off
    assert (model["original_length"], model["trained_length"]) == (64, SEQUENCE_LEN)
    assert model["rope_parameters"]["factor"] == 4.0
    assert {(r["convention"], r["length"]) for r in ppl["results"]} == {
        (c, n) for c in ("window-mean", "sliding-window") for n in EVAL_BLOCK["ppl_lengths"]
    }
    for r in ppl["results"]:
        assert 1 <= r["windows"] <= 2 or (r["convention"], r["length"]) == ("sliding-window", 256)
        assert (r["ppl"] is None) == (r["windows"] == 0), r
    passkey = json.loads((eval_dir / "passkey.json").read_text())
    assert [(r["length"], r["depth"], r["trials"]) for r in passkey["results"]] == [(256, 0.5, 2)]


def test_eval_cli_on_adapter_and_merged_dirs(merged, runs, base_models, workdir, tmp_path, capsys):
    """``longlora eval`` on the base (plain and interpolation-only), the adapter output
    dir and the merged dir: the adapter (base + adapter + the run's RoPE) and the merged
    model give the same perplexity and passkey answers, and the same perplexity as the
    end-of-training evaluation of the in-memory model."""
    from longlora_plugin.cli import main

    name = "llama_lora_packed_s2"
    adapter, merged_dir, base = runs[name].out_dir, merged[name], base_models["llama"]
    models = [f"base={base}", f"pi4={base}", f"adapter={adapter}", f"merged={merged_dir}"]
    model_args = [arg for m in models for arg in ("--model", m)] + ["--rope", "pi4=linear:4"]
    lengths = ",".join(str(n) for n in EVAL_BLOCK["ppl_lengths"])
    common = [*model_args, "--lengths", lengths, "--device", "cpu", "--no-progress"]
    assert (
        main(
            ["eval", "ppl", *common, "--data", str(workdir / "data.jsonl"), "--max-windows", "2"]
            + ["--out", str(tmp_path / "ppl")]
        )
        == 0
    )
    ppl = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    info = {m["name"]: m for m in ppl["models"]}
    assert info["adapter"]["kind"] == "adapter" and info["pi4"]["kind"] == "interpolation-only"
    for key in ("adapter", "merged"):
        assert info[key]["rope_parameters"]["factor"] == 4.0
        assert (info[key]["original_length"], info[key]["trained_length"]) == (64, SEQUENCE_LEN)
    by = {(r["model"], r["convention"], r["length"]): r["ppl"] for r in ppl["results"]}
    in_memory = json.loads((adapter / "longlora_eval" / "ppl.json").read_text())["results"]
    for row in in_memory:
        key = (row["convention"], row["length"])
        if row["ppl"] is None:  # no window at this length
            assert by[("adapter", *key)] is None and by[("merged", *key)] is None
            continue
        assert by[("adapter", *key)] == pytest.approx(by[("merged", *key)], rel=1e-5)
        assert by[("adapter", *key)] == pytest.approx(row["ppl"], rel=1e-4)
        assert by[("adapter", *key)] != pytest.approx(by[("pi4", *key)], rel=1e-4)

    assert (
        main(
            ["eval", "passkey", *common, "--lengths", "256", "--depths", "0.5", "--trials", "2"]
            + ["--out", str(tmp_path / "passkey")]
        )
        == 0
    )
    trials = json.loads((tmp_path / "passkey" / "passkey.json").read_text())["trials"]
    answers = {m: [t["answer"] for t in trials if t["model"] == m] for m in ("adapter", "merged")}
    assert answers["adapter"] == answers["merged"] and len(answers["adapter"]) == 2
    assert "Passkey retrieval accuracy" in capsys.readouterr().out


def test_eval_during_training_leaves_training_as_it_was(runs):
    """every_n_steps: 1 evaluates after each of the 3 steps with full attention; the
    losses equal those of the same run without it, so S2-Attn (whose losses differ from
    full attention's: test_s2_attn_changes_training), the training mode and the random
    states were all given back."""
    run = runs["llama_lora_packed_s2"]
    text = run.log()
    assert "longlora: evaluating every 1 steps at 64, 256 tokens" in text
    progress = json.loads((run.out_dir / "longlora_eval" / "progress.json").read_text())
    assert [e["step"] for e in progress["evaluations"]] == [1, 2, 3]
    for evaluation in progress["evaluations"]:
        assert set(evaluation["ppl"]) == {"64", "256"}, evaluation
        assert all(math.isfinite(v) for v in evaluation["ppl"].values()), evaluation
        assert evaluation["seconds"] > 0
    assert (run.out_dir / "longlora_eval" / "progress.png").read_bytes()[:4] == b"\x89PNG"
    assert text.count("longlora: progress eval at step") == 3
    quiet = _losses(runs["llama_lora_packed_s2_no_eval"])
    assert _losses(run) == quiet
