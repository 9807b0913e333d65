"""What each of Axolotl's memory features does to the estimate, against numbers worked out
here by hand for Llama-2 7B (V 32000, h 4096, I 11008, 32 layers of 32 heads of 128) and
Llama-3 8B (V 128256) at 65,536 tokens, bf16, one row per GPU, DeepSpeed ZeRO-2 on 8 GPUs.
Each expected figure is written out as arithmetic, not computed by the estimator's code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longlora_plugin.memory import GIB, ModelDims, Parallelism, TrainingShape, estimate_memory
from longlora_plugin.memory_features import MemoryFeatures, suggestion

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests/fixtures/model_configs"
LLAMA2_7B = ModelDims.from_config(json.loads((FIXTURES / "Llama-2-7b-hf/config.json").read_text()))
LLAMA3_8B = ModelDims.from_config(
    json.loads((FIXTURES / "Meta-Llama-3-8B/config.json").read_text())
)
ZERO2 = Parallelism(world_size=8, zero_stage=2, label="ZeRO-2")
T = 65536  # tokens of the row
P_7B = 6_738_415_616


def estimate(features: MemoryFeatures, dims: ModelDims = LLAMA2_7B, parallelism=ZERO2):
    shape = TrainingShape(T, 1, T // 4, features=features)
    return estimate_memory(dims, shape, parallelism, trainable_params=139_726_848, flash=True)


def test_loss_options_against_hand_counts():
    # plain: bf16 logits + fp32 log-softmax + fp32 output and input gradients, 14 B/logit
    assert estimate(MemoryFeatures()).logits == 65536 * 32000 * 14 == 29_360_128_000
    # chunked (8): bf16 logits and gradient (4 B) + 12 B of fp32 buffers / 8
    assert estimate(MemoryFeatures(loss="chunked")).logits == 65536 * 32000 * 5.5
    assert estimate(MemoryFeatures(loss="chunked", loss_chunks=16)).logits == 65536 * 32000 * 4.75
    # CCE: the hidden states' bf16 gradient (8192 B/token) and the fp32 LSE (4 B/token)
    assert estimate(MemoryFeatures(loss="cce")).logits == 65536 * 8196 == 537_133_056
    # Liger: ceil(32000 / 4096) = 8, 65536 / 8 = 8192 rows per chunk (a power of 2)
    assert estimate(MemoryFeatures(loss="liger")).logits == 537_133_056 + 8192 * 32000 * 2
    # Llama-3: ceil(128256 / 4096) = 32, 65536 / 32 = 2048 rows of 128,256 logits
    llama3 = estimate(MemoryFeatures(loss="liger"), LLAMA3_8B)
    assert llama3.logits == 537_133_056 + 2048 * 128256 * 2
    assert estimate(MemoryFeatures(), LLAMA3_8B).logits / GIB == pytest.approx(109.6, abs=0.05)


def test_liger_chunk_rounds_up_to_a_power_of_two_and_stops_at_the_row():
    dims = LLAMA2_7B
    # 3000 tokens: ceil(3000 / 8) = 375 -> 512 rows
    shape = TrainingShape(3000, 1, 750, features=MemoryFeatures(loss="liger"))
    got = estimate_memory(dims, shape, ZERO2, trainable_params=1).logits
    assert got == 3000 * 8196 + 512 * 32000 * 2
    # 5 tokens: ceil(5 / 8) = 1 row per chunk
    shape = TrainingShape(5, 1, 2, features=MemoryFeatures(loss="liger"))
    assert estimate_memory(dims, shape, ZERO2, trainable_params=1).logits == 5 * 8196 + 32000 * 2


def test_activation_offloading_keeps_the_stash_of_checkpoints():
    per_layer = 65536 * 4096 * 2  # one checkpointed layer input, 0.5 GiB
    assert estimate(MemoryFeatures()).terms["checkpoints"] == 32 * per_layer == 16 * GIB
    assert estimate(MemoryFeatures(offload="true")).terms["checkpoints"] == 5 * per_layer
    assert estimate(MemoryFeatures(offload="disk")).terms["checkpoints"] == 2.5 * GIB
    assert estimate(MemoryFeatures(offload="legacy")).terms["checkpoints"] == per_layer
    # the peak falls by the same 13.5 GiB
    saved = estimate(MemoryFeatures()).peak - estimate(MemoryFeatures(offload="true")).peak
    assert saved == 27 * per_layer == 13.5 * GIB


def test_tiled_mlp_divides_the_mlp_intermediates():
    # per token: 8h fp32 norm tensors + w * (5h + 3 Hkv d + 4I)
    plain = 65536 * (8 * 4096 + 2 * (5 * 4096 + 3 * 32 * 128 + 4 * 11008))
    assert plain == 12_213_813_248  # 11.375 GiB
    assert estimate(MemoryFeatures()).layer == plain
    # Axolotl's default: ceil(65536 / 32768) = 2 shards
    two = 65536 * (8 * 4096 + 2 * (5 * 4096 + 3 * 32 * 128) + 2 * 4 * 11008 / 2)
    assert estimate(MemoryFeatures(tiled_mlp_shards=0)).layer == two == 9_328_132_096
    eight = 65536 * (8 * 4096 + 2 * (5 * 4096 + 3 * 32 * 128) + 2 * 4 * 11008 / 8)
    assert estimate(MemoryFeatures(tiled_mlp_shards=8)).layer == eight == 7_163_871_232
    # at 16k Axolotl's default is one shard: nothing changes
    short = TrainingShape(16384, 1, 4096, features=MemoryFeatures(tiled_mlp_shards=0))
    untiled = TrainingShape(16384, 1, 4096)
    layers = [
        estimate_memory(LLAMA2_7B, s, ZERO2, trainable_params=1).layer for s in (short, untiled)
    ]
    assert layers[0] == layers[1]


def test_quantised_weights():
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and the gated MLP
    assert linear == 6_476_005_376
    rest = P_7B - linear  # embeddings, LM head, 65 norms
    assert rest == 2 * 32000 * 4096 + 65 * 4096
    bf16 = estimate(MemoryFeatures()).terms["weights"]
    assert bf16 == 2 * P_7B == 13_476_831_232
    nf4 = estimate(MemoryFeatures(weight_bits=4)).terms["weights"]
    # 0.5 B per weight, an 8-bit absmax per 64 weights, an fp32 absmax per 256 blocks
    assert nf4 == 2 * rest + linear // 2 + linear // 64 + linear // 4096 == 3_865_591_808
    single = estimate(MemoryFeatures(weight_bits=4, double_quant=False)).terms["weights"]
    assert single == 2 * rest + linear // 2 + linear // 16
    assert estimate(MemoryFeatures(weight_bits=8)).terms["weights"] == 2 * rest + linear
    # ZeRO-3 shards the quantised weights too (+ two gathered layers)
    zero3 = Parallelism(world_size=8, zero_stage=3, label="ZeRO-3")
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    gathered = 2 * (2 * 2 * 4096 + layer * (0.5 + 1 / 64 + 4 / 16384))
    got = estimate(MemoryFeatures(weight_bits=4), parallelism=zero3).terms["weights"]
    assert got == pytest.approx(3_865_591_808 / 8 + gathered)


def test_dominant_term_and_suggestions():
    # Llama-3 8B, chunked loss: the logits dominate; CCE is the way further down
    est = estimate(MemoryFeatures(loss="chunked"), LLAMA3_8B)
    term, size = est.dominant()
    assert term == "logits and loss" and size == 65536 * 128256 * 5.5
    advice = suggestion(term, MemoryFeatures(loss="chunked"), zero_stage=3, offloaded=False)
    assert "delete `chunked_cross_entropy: true`" in advice
    assert "`- axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin`" in advice
    plain = suggestion(term, MemoryFeatures(), zero_stage=3, offloaded=False)
    assert plain.startswith("add `chunked_cross_entropy: true`")
    # Llama-2 7B, chunked: 16 GiB of checkpoints beat 11.4 GiB of layer and 10.7 of logits
    est = estimate(MemoryFeatures(loss="chunked"))
    assert est.dominant() == ("checkpoints", 16 * GIB)
    advice = suggestion("checkpoints", MemoryFeatures(), zero_stage=2, offloaded=False)
    assert "add `activation_offloading: true`" in advice
    # offloaded: 2.5 GiB of checkpoints; under ZeRO-2 the 12.55 GiB of bf16 weights lead
    est = estimate(MemoryFeatures(loss="chunked", offload="true"))
    assert est.dominant() == ("weights", 2 * P_7B)
    assert "zero3.json" in suggestion("weights", MemoryFeatures(), zero_stage=2, offloaded=False)
    # under ZeRO-3 (1.6 GiB of weights + 2 gathered layers) the recomputed layer leads
    zero3 = Parallelism(world_size=8, zero_stage=3, label="ZeRO-3")
    est = estimate(MemoryFeatures(loss="chunked", offload="true"), parallelism=zero3)
    assert est.dominant()[0] == "recomputed layer + attention"
    assert est.dominant()[1] == pytest.approx(12_213_813_248 + 65536 * 32 * 4)
    advice = suggestion(est.dominant()[0], MemoryFeatures(), zero_stage=2, offloaded=False)
    assert "add `tiled_mlp: true`" in advice
    for feats in (MemoryFeatures(offload="true"), MemoryFeatures(tiled_mlp_shards=0)):
        term = "checkpoints" if feats.offload else "recomputed layer + attention"
        assert "longlora.context_parallel: 2" in suggestion(
            term, feats, zero_stage=2, offloaded=False
        )
    assert "zero3_offload.json" in suggestion(
        "optimizer", MemoryFeatures(), zero_stage=3, offloaded=False
    )
    assert "load_in_4bit: true" in suggestion(
        "weights", MemoryFeatures(), zero_stage=3, offloaded=True
    )


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({}, MemoryFeatures()),
        ({"chunked_cross_entropy": True}, MemoryFeatures(loss="chunked")),
        (
            {"chunked_cross_entropy": True, "chunked_cross_entropy_num_chunks": 16},
            MemoryFeatures(loss="chunked", loss_chunks=16),
        ),
        (
            {
                "cut_cross_entropy": True,
                "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
            },
            MemoryFeatures(loss="cce"),
        ),
        ({"cut_cross_entropy": True}, MemoryFeatures()),  # without its plugin: inactive
        (
            {
                "liger_fused_linear_cross_entropy": True,
                "plugins": ["axolotl.integrations.liger.LigerPlugin"],
            },
            MemoryFeatures(loss="liger"),
        ),
        ({"activation_offloading": True}, MemoryFeatures(offload="true")),
        ({"activation_offloading": "legacy"}, MemoryFeatures(offload="legacy")),
        ({"tiled_mlp": True}, MemoryFeatures(tiled_mlp_shards=0)),
        ({"tiled_mlp": True, "tiled_mlp_num_shards": 4}, MemoryFeatures(tiled_mlp_shards=4)),
        ({"adapter": "qlora", "load_in_4bit": True}, MemoryFeatures(weight_bits=4)),
        ({"load_in_8bit": True}, MemoryFeatures(weight_bits=8)),
    ],
)
def test_features_read_from_an_axolotl_config(cfg, expected):
    assert MemoryFeatures.from_axolotl(cfg) == expected
