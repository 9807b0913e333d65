"""Two-process data-parallel training on CPU (torchrun, gloo backend) with the plugin.

``python -m torch.distributed.run --nproc_per_node 2 -m axolotl.cli.train cfg.yml`` is
what ``axolotl train cfg.yml --launcher torchrun -- --nproc_per_node 2`` runs. Each rank
loads its own model, so each rank must apply S2-Attn, the RoPE interpolation and the
trainable embeddings/norms itself. The LongLoRA plugin logs from rank 0 only; the test
adds a second, real Axolotl plugin (``tests/support/rank_probe_plugin.py``) that writes every
rank's model state during training.

Two things Axolotl 0.19 needs to run several ranks on a CPU-only machine (neither is
needed with GPUs): ``ACCELERATE_USE_CPU=true`` in the environment (``accelerate launch
--cpu`` sets it), or the HF Trainer builds a non-distributed state and every rank trains
alone with no gradient synchronisation; and ``device_map`` on the CPU, which the probe
plugin sets (Axolotl assigns ``{"": LOCAL_RANK}``, an accelerator index). DDP only:
DeepSpeed ZeRO-2 does not run on CPU under Axolotl 0.19 (see docs/configs.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from longlora_plugin.offline import OFFLINE_ENV
from tests.support.tiny_models import CPU_AXOLOTL, build_tiny_model, write_text_dataset

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(work: Path, **extra) -> tuple[Path, Path, str]:
    """Train the tiny config in two processes; return (output_dir, base model, log)."""
    base = build_tiny_model(work / "base", arch="llama")
    dataset = write_text_dataset(work / "data.jsonl")
    out = work / "out"
    cfg = {
        "base_model": str(base),
        "plugins": [
            "longlora_plugin.LongLoRAPlugin",
            "tests.support.rank_probe_plugin.RankProbePlugin",
        ],
        "longlora": {},
        "datasets": [{"path": str(dataset), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(out),
        "sequence_len": 256,
        "sample_packing": True,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        **CPU_AXOLOTL,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 42,
        **extra,
    }
    cfg_path = work / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # What `accelerate launch --cpu` sets: the HF Trainer then builds a CPU (gloo)
            # distributed state. Without it Axolotl's CPU ranks train unsynchronised.
            "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "axolotl.cli.train",
        str(cfg_path),
    ]
    proc = subprocess.run(
        cmd,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    (work / "run.log").write_text(proc.stdout)
    assert proc.returncode == 0, f"torchrun failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}"
    return out, base, proc.stdout


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory):
    return run_two_ranks(tmp_path_factory.mktemp("ddp"))


def check_ranks(out: Path, log: str) -> None:
    records = [json.loads(p.read_text()) for p in sorted((out / "rank_probe").glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1], records
    for record in records:
        assert record["world_size"] == 2 and record["args_world_size"] == 2
        assert record["accelerate"].endswith("MULTI_CPU")
        assert "DISTRIBUTED" in record["parallel_mode"]
        assert record["attn_implementation"].startswith("longlora_s2"), record
        assert record["s2_group_size"] == 64
        assert record["trainable_embed"] and record["trainable_norm"], record
        assert record["trainable_lora"] == 2 * 4 * 2  # 2 layers x q/k/v/o x (A, B)
        assert record["steps"] == 3
    # DDP averaged the modules_to_save gradients: the trained embeddings agree.
    assert records[0]["embed_digest"] == records[1]["embed_digest"]
    assert "longlora: S2-Attn on 2 attention layers, group size 64, shift 32" in log
    assert "longlora: RoPE linear factor 4.0 (original 64, target 256)" in log


def test_every_rank_trains_with_s2_attn(ddp_run):
    out, _, log = ddp_run
    check_ranks(out, log)


def test_adapter_holds_embedding_and_norms(ddp_run):
    from safetensors.torch import load_file

    out, base, _ = ddp_run
    adapter = load_file(str(out / "adapter_model.safetensors"))
    base_weights = load_file(str(base / "model.safetensors"))
    embed = adapter["base_model.model.model.embed_tokens.weight"]
    assert not torch.equal(embed, base_weights["model.embed_tokens.weight"])
    norms = [k for k in adapter if k.endswith("norm.weight")]
    assert len(norms) == 2 * 2 + 1, sorted(adapter)
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_parameters"]["factor"] == 4.0
