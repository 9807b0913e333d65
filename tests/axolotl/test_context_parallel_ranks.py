"""``longlora.context_parallel`` in ``axolotl train`` on four CPU ranks (DDP over gloo):
each row split over all four ranks (P=4), and over two ranks times two data-parallel
groups (P=2). Both must train what the same four ranks train on whole rows without
splitting, and evaluate (Axolotl's ``val_set_size``, whole rows) to the same loss. (Two ranks, under DDP and ZeRO-3: ``tests/axolotl/test_sharding.py``; the
attention and gradient equality per token: ``tests/s2/test_context_parallel.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support.ranks import axolotl, environment, lora_config, probe_records, write_config
from tests.support.tiny_models import build_tiny_model, write_text_dataset

RANKS = 4
SPLITS = {"whole": 1, "P4": 4, "DP2xP2": 2}
# Axolotl's evaluation at step 2: whole rows per rank, full attention, also when split
EVALUATE = {"val_set_size": 0.25, "eval_strategy": "steps", "eval_steps": 2}
# One document per row, unpadded: the ranks of a group hold rows of different lengths,
# which the split step pads to a common multiple of P (masked, not scored). Packed rows:
# tests/axolotl/test_sharding.py.
UNPACKED = {"sample_packing": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """(output_dir, log) of each run: the same tiny Llama, rows, seed and schedule."""
    work = tmp_path_factory.mktemp("cp-ranks")
    base = build_tiny_model(work / "base", arch="llama")
    dataset = write_text_dataset(work / "data.jsonl")
    done = {}
    for name, size in SPLITS.items():
        run_dir = work / name
        run_dir.mkdir()
        block = {"context_parallel": size} if size > 1 else {}
        cfg = lora_config(base, dataset, run_dir, longlora=block, **EVALUATE, **UNPACKED)
        cfg_path = write_config(run_dir / "cfg.yml", cfg)
        env = environment(ACCELERATE_USE_CPU="true")
        done[name] = (run_dir / "out", axolotl("train", cfg_path, ranks=RANKS, env=env).stdout)
    return done


def _losses(log: str, key: str = "loss") -> list[str]:
    return re.findall(rf"'{key}': '?([0-9.]+)", log)


@pytest.mark.parametrize("name", ["P4", "DP2xP2"])
def test_rows_split_over_four_ranks_train_what_whole_rows_train(runs, name):
    """The ranks' rows differ in length; every rank runs one chunk of each of its
    group's ``P`` rows, padded to the group's longest (its forward passes show it); the
    logged losses, the evaluation loss and the trained adapter equal the whole-row
    run's (adapters up to fp32 summation order; 3 Adam steps at lr 1e-3 move weights by
    ~3e-3)."""
    size = SPLITS[name]
    whole, whole_log = runs["whole"]
    split, log = runs[name]
    groups = RANKS // size
    line = f"each row split over {size} processes ({groups} data-parallel group"
    assert line in log
    assert [r["world_size"] for r in probe_records(split)] == [RANKS] * RANKS
    names = {r["attn_implementation"] for r in probe_records(split)}
    assert names == {f"longlora_s2_sdpa_g64_cp{size}"}
    lengths = [r["forward_lengths"] for r in probe_records(whole)]
    assert all(len(seen) == 1 for seen in lengths) and len({seen[0] for seen in lengths}) > 1
    chunks = []  # each rank: P chunks of the group's longest row, rounded up to P
    for first in range(0, RANKS, size):
        longest = max(seen[0] for seen in lengths[first : first + size])
        chunks += [[-(-longest // size)] * size] * size
    assert [r["forward_lengths"] for r in probe_records(split)] == chunks
    assert _losses(log) == _losses(whole_log) and len(_losses(log)) == 3
    evaluated = _losses(log, "eval_loss")
    assert evaluated == _losses(whole_log, "eval_loss") and len(evaluated) >= 1
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(split / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it trained
