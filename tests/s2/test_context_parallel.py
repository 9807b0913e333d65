"""S2-Attn with context parallelism (``longlora_plugin/s2/context_parallel.py``,
``halo_exchange.py``, ``row_gather.py``): rows split over 2 and 4 CPU processes
(``torch.distributed.run``, gloo) give the loss, logits and parameter gradients of
single-process S2, leak nothing backwards, and send exactly the halo bytes of the cost
model."""

from __future__ import annotations

import json

import pytest
import torch

from longlora_plugin.s2.halo_exchange import halo_needs
from tests.support import cp_worker
from tests.support.ranks import run_module

TOLERANCE = 1e-5  # fp32


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """Every rank's records of ``tests/support/cp_worker.py`` run on ``P`` processes."""
    size = request.param
    out = tmp_path_factory.mktemp(f"cp{size}")
    run_module("tests.support.cp_worker", str(out), log=out / "run.log", ranks=size)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    assert all(rec["size"] == size for rec in records)
    return size, records


def test_split_rows_equal_single_process_s2(ranks):
    size, records = ranks
    cases = {(c["arch"], c["layout"], c["group"]) for c in records[0]["cases"]}
    assert len(cases) == len(cp_worker.ARCHS) * len(cp_worker.LAYOUTS) * len(cp_worker.GROUPS)
    chunk = cp_worker.LENGTH // size
    assert min(cp_worker.GROUPS) < chunk and chunk in cp_worker.GROUPS  # G < C, G = C
    assert max(cp_worker.GROUPS) > chunk  # G > C: halos span ranks
    for rank, record in enumerate(records):
        for case in record["cases"]:
            worst = max(case["loss_diff"], case["logits_diff"], case["grad_diff"])
            assert worst <= TOLERANCE, (rank, case)


def test_nothing_leaks_backwards_across_ranks(ranks):
    size, records = ranks
    leaks = [next(c for c in r["cases"] if "leak_diff" in c)["leak_diff"] for r in records]
    assert all(leak["earlier"] == 0.0 for leak in leaks), leaks
    assert max(leak["later"] for leak in leaks) > 0.1  # the perturbation does reach the model


def test_micro_batches_of_different_lengths_are_gathered_padded_at_the_end(ranks):
    size, records = ranks
    longest = 10 + 3 * (size - 1)
    target = -(-longest // size) * size
    for record in records:
        assert record["gathered"] == {"lengths": [target] * size, "kept": True, "padded": True}


def test_eval_mode_is_refused_with_a_reason(ranks):
    _, records = ranks
    case = next(c for c in records[0]["cases"] if "leak_diff" in c)
    assert "training mode only" in case["eval_error"]


def _needs(positions: torch.Tensor, valid: torch.Tensor, group: int, shift: int, chunk: int):
    """Halo sizes, by walking each row back from each chunk's first token (independent of
    the package's vectorised version)."""
    needs = []
    for first in range(0, positions.shape[1], chunk):
        need = 0
        for row in range(positions.shape[0]):
            p, ok = positions[row].tolist(), valid[row].tolist()
            if not ok[first]:
                continue
            j = first
            while (
                j > 0
                and ok[j - 1]
                and p[j] == p[j - 1] + 1
                and (p[j] + shift) // group == (p[j - 1] + shift) // group
            ):
                j -= 1
            need = max(need, first - j)
        needs.append(need)
    return needs


def _kv_heads(heads: int, kv_heads: int) -> tuple[int, int]:
    """Key/value heads sent for each half: whole kv heads when the half boundary falls
    on a GQA group boundary, else one per query head (as ``kv_for_heads``)."""
    rep, half = heads // kv_heads, heads // 2
    if half % rep == 0:
        return half // rep, (heads - half) // rep
    return half, heads - half


def test_sent_bytes_follow_the_cost_model(ranks):
    size, records = ranks
    chunk = cp_worker.LENGTH // size
    for rank, record in enumerate(records):
        for case in record["cases"]:
            batch = cp_worker.rows(case["layout"])
            positions = batch.get(
                "position_ids", torch.arange(cp_worker.LENGTH)[None].expand(2, -1)
            )
            valid = batch.get("attention_mask", torch.ones(2, cp_worker.LENGTH)).bool()
            cfg, group = case["config"], case["group"]
            kv = _kv_heads(cfg["heads"], cfg["kv_heads"])
            sent = 0
            for half, shift in enumerate((0, group // 2)):
                needs = _needs(positions, valid, group, shift, chunk)
                if case["arch"] == "mistral-window":
                    needs = [min(n, 6 - 1) for n in needs]  # sliding_window 6
                for dest in range(rank + 1, size):
                    lo = max(rank * chunk, dest * chunk - needs[dest])
                    hi = min((rank + 1) * chunk, dest * chunk)
                    sent += max(0, hi - lo) * kv[half]
            expected = 2 * 2 * cfg["head_dim"] * 4 * sent  # K and V, B=2, fp32
            assert case["sent_bytes"] == [expected] * cfg["layers"], (rank, case)


def test_aligned_unpacked_rows_send_half_a_group_of_the_shifted_heads(ranks):
    """C a multiple of G, unpacked rows: the unshifted heads send nothing, the shifted
    ones G/2 tokens to the next rank (the docs' closed form); ring attention would send
    C * (P - 1) tokens of every kv head."""
    size, records = ranks
    chunk = cp_worker.LENGTH // size
    for rank, record in enumerate(records):
        for case in record["cases"]:
            group = case["group"]
            if case["arch"] != "llama" or case["layout"] != "plain" or chunk % group:
                continue
            cfg = case["config"]
            per_token = 2 * 2 * cfg["head_dim"] * 4  # K and V, B=2, fp32, one kv head
            shifted_kv = cfg["kv_heads"] // 2
            expected = per_token * shifted_kv * group // 2 if rank < size - 1 else 0
            assert case["sent_bytes"][0] == expected, (rank, case)
            ring = per_token * cfg["kv_heads"] * chunk * (size - 1)
            assert expected < ring


def test_halo_needs_by_hand():
    positions = torch.arange(16)[None]
    # G=4, chunks of 4: aligned, so the unshifted heads need nothing and the shifted 2
    assert halo_needs(positions, None, 4, 0, 4) == (0, 0, 0, 0)
    assert halo_needs(positions, None, 4, 2, 4) == (0, 2, 2, 2)
    # G=8 > chunk 4: the second chunk continues a group started 4 tokens before
    assert halo_needs(positions, None, 8, 0, 4) == (0, 4, 0, 4)
    # a document starting at index 6 cuts the halo of the chunk at 8 to 2 tokens, and its
    # groups count from its own start: index 12 (position 6) needs 6; padding needs none
    packed = torch.cat([torch.arange(6), torch.arange(10)])[None]
    assert halo_needs(packed, None, 8, 0, 4) == (0, 4, 2, 6)
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[0, 11:] = False
    assert halo_needs(positions, valid, 8, 0, 4) == (0, 4, 0, 0)
    assert halo_needs(positions, None, 8, 0, 4, window=3) == (0, 2, 0, 2)


def test_shard_needs_rows_that_split_evenly():
    from longlora_plugin.s2.context_parallel import ContextParallel

    class Two(ContextParallel):
        size, rank = 2, 1  # type: ignore[assignment]

    batch = {"input_ids": torch.arange(10)[None], "labels": torch.arange(10)[None]}
    local = Two().shard(batch)
    assert local["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert local["position_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert local["shift_labels"].tolist() == [[6, 7, 8, 9, -100]]
    assert local["labels"].tolist() == [[5, 6, 7, 8, 9]]  # what token counters read
    with pytest.raises(
        ValueError, match="row length 9 is not a multiple of the context-parallel size 2"
    ):
        Two().shard({"input_ids": torch.arange(9)[None]})


@pytest.mark.parametrize(("world", "cp"), [(2, 2), (4, 4), (4, 2)], ids=["P2", "P4", "DP2xP2"])
def test_longlora_training_split_over_ranks_equals_one_process(
    tiny_llama, text_dataset, tmp_path, world, cp
):
    """A few LongLoRA steps (LoRA + embeddings and norms, RoPE x4, S2 G=64 on 256-token
    rows) with each row split over ``cp`` processes, crossed with ``world / cp``
    data-parallel replicas: the same losses and trained parameters as one process."""
    run_module(
        "tests.support.cp_train",
        str(tiny_llama),
        str(text_dataset),
        str(tmp_path),
        "--cp",
        str(cp),
        log=tmp_path / "run.log",
        ranks=world,
    )
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for record in records:
        assert record["attn_implementation"] == f"longlora_s2_sdpa_g64_cp{cp}"
        split, single = record["losses"]["split"], record["losses"]["single"]
        assert len(split) == 3 and split[0] > 1.0
        assert split == pytest.approx(single, abs=TOLERANCE), record
        assert split[-1] < split[0]  # it trains
        assert record["param_diff"] <= 1e-4, record
    assert max(r["sent_bytes_max"] for r in records) > 0
