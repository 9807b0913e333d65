"""S2-Attn attention function against the independent dense reference (bare function)."""

from __future__ import annotations

import sys
import types
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longlora_plugin.s2.backend import S2Settings, s2_attention_forward
from longlora_plugin.s2.layout import build_layout, regular_pieces
from s2_harness import varlen_contracts
from s2_harness.calls import BACKENDS, Attn, run_s2
from s2_harness.reference import dense_attention, s2_allowed


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3, 4]))
    length = draw(st.integers(1, 48))
    group = draw(st.integers(2, 40))
    rows, valid = [], []
    for _ in range(batch):
        pad = draw(st.integers(0, length // 2))
        left = draw(st.booleans())
        # documents: sample packing restarts positions at 0
        real, pos = length - pad, []
        while len(pos) < real:
            doc = draw(st.integers(1, real - len(pos)))
            pos.extend(range(doc))
        pads = [0] * pad
        rows.append(pads + pos if left else pos + pads)
        flags = [False] * pad
        valid.append(flags + [True] * real if left else [True] * real + flags)
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    backend = draw(st.sampled_from(BACKENDS))
    seed = draw(st.integers(0, 2**16))
    return (
        batch,
        heads,
        kv_heads,
        length,
        group,
        torch.tensor(rows),
        torch.tensor(valid),
        window,
        backend,
        seed,
    )


def _tensors(batch, heads, kv_heads, length, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, requires_grad=True)
    return q, k, v


def _grads(out, q, k, v, weight):
    (out * weight).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return grads


@settings(max_examples=150, deadline=None)
@given(batches())
def test_matches_dense_reference_outputs_and_gradients(case):
    batch, heads, kv_heads, length, group, pos, valid, window, backend, seed = case
    q, k, v = _tensors(batch, heads, kv_heads, length, seed=seed)
    weight = torch.randn(batch, length, heads, 8) * valid[:, :, None, None]
    out = run_s2(backend, q, k, v, group, pos, valid, window)
    ref = dense_attention(q, k, v, s2_allowed(pos, valid, heads, group, window), 8**-0.5)
    keep = valid[:, :, None, None]
    assert torch.allclose(out * keep, ref * keep, atol=1e-5, rtol=0)
    assert torch.all(out[~valid] == 0), "padding queries output zeros"
    for mine, theirs in zip(
        _grads(out, q, k, v, weight), _grads(ref, q, k, v, weight), strict=True
    ):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_no_leak_from_later_tokens_in_any_head(backend, packed):
    """Perturbing key/value j never changes any output at positions < j, in every head."""
    batch, heads, kv_heads, length, group = 2, 6, 3, 40, 8
    pos = torch.arange(length)[None].expand(batch, length).clone()
    if packed:
        pos[:, 13:] = torch.arange(length - 13)
        pos[:, 29:] = torch.arange(length - 29)
    q, k, v = _tensors(batch, heads, kv_heads, length)
    base = run_s2(backend, q, k, v, group, pos, None)
    for j in range(length):
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, :, j:] += 3.0
        v2[:, :, j:] -= 5.0
        out = run_s2(backend, q, k2, v2, group, pos, None)
        assert torch.equal(out[:, :j], base[:, :j]), f"position < {j} saw a later token"
        if j + 1 < length:
            # and the perturbation is visible somewhere (the test can fail)
            assert not torch.equal(out[:, j:], base[:, j:])


def test_training_never_builds_the_full_mask():
    def explode(**kwargs):
        raise AssertionError("the L x L mask was built in training")

    q, k, v = _tensors(1, 4, 2, 64)
    pos = torch.arange(64)[None]
    run_s2("sdpa", q, k, v, 16, pos, None, builder=explode)
    packed = torch.cat([torch.arange(30), torch.arange(34)])[None]
    run_s2("sdpa", q, k, v, 16, packed, torch.ones(1, 64, dtype=torch.bool), builder=explode)


def test_eval_mode_calls_the_wrapped_backend_with_its_own_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _tensors(2, 4, 2, 20)
    mask4d = (
        torch.tril(torch.ones(20, 20, dtype=torch.bool))[None, None].expand(2, 1, 20, 20).clone()
    )
    mask4d[1, :, :, :5] = False
    calls = []

    def builder(**kwargs):
        calls.append(kwargs)
        return mask4d

    out = run_s2("sdpa", q, k, v, 4, torch.arange(20)[None], None, training=False, builder=builder)
    expected, _ = sdpa_attention_forward(
        Attn(2).eval(), q, k, v, mask4d, scaling=8**-0.5, dropout=0.0
    )
    assert torch.equal(out, expected)
    assert len(calls) == 1


def test_group_larger_than_row_keeps_the_shifted_split():
    # G >= L: unshifted heads are plain causal, shifted heads still split at G - G//2.
    q, k, v = _tensors(1, 2, 2, 10)
    pos = torch.arange(10)[None]
    out = run_s2("sdpa", q, k, v, 16, pos, None)
    ref = dense_attention(
        q, k, v, s2_allowed(pos, torch.ones(1, 10, dtype=torch.bool), 2, 16), 8**-0.5
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_regular_pieces_cover_the_row_exactly():
    for length in range(1, 40):
        for group in range(2, 12):
            for shift in (0, group // 2):
                pieces = regular_pieces(length, group, shift)
                covered = [
                    p.start + c * p.length + i
                    for p in pieces
                    for c in range(p.count)
                    for i in range(p.length)
                ]
                assert covered == list(range(length))
                # every piece is one group under the rule (p + shift) // G
                for p in pieces:
                    for c in range(p.count):
                        first = p.start + c * p.length
                        groups = {(x + shift) // group for x in range(first, first + p.length)}
                        assert len(groups) == 1


def test_segments_buckets_reassemble_valid_tokens():
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    valid = torch.tensor([[True] * 9 + [False], [False, False] + [True] * 8])
    layout = build_layout(pos, valid, (2, 10), 4, "padded", torch.device("cpu"))
    seg = layout.segments[1]
    dests = torch.cat([b.dest for b in seg.buckets]).sort().values
    assert torch.equal(dests, valid.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(layout.token_index, dests)
    assert int(seg.cu_seqlens[-1]) == int(valid.sum()) == layout.num_tokens


def test_varlen_layout_joins_both_halves():
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None].expand(2, -1)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    layout = build_layout(pos, valid, (2, 12), 4, "varlen", torch.device("cpu"))
    unshifted, shifted = layout.segments
    assert layout.num_tokens == 22 and layout.pieces is None
    assert unshifted.cu_seqlens.tolist() == [0, 4, 7, 11, 12, 16, 19, 22]
    assert shifted.cu_seqlens.tolist() == [0, 2, 6, 7, 9, 12, 14, 18, 19, 21, 22]
    assert (unshifted.max_seqlen, shifted.max_seqlen) == (4, 4)
    assert layout.joined.cu_seqlens.tolist() == unshifted.cu_seqlens.tolist() + [
        22 + int(c) for c in shifted.cu_seqlens[1:]
    ]
    assert layout.joined.max_seqlen == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [4, 3])
def test_batch_of_only_padding(backend, heads):
    """Every token padding (max_seqlen 0): zeros out, zero (not missing) gradients."""
    q, k, v = _tensors(2, heads, 1, 6)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    out = run_s2(backend, q, k, v, 4, torch.arange(6)[None], valid)
    assert out.shape == (2, 6, heads, 8) and torch.all(out == 0)
    out.sum().backward()
    assert all(t.grad is not None and torch.all(t.grad == 0) for t in (q, k, v))


def test_window_with_gqa_repeats_kv_heads_instead_of_enable_gqa():
    """A mask together with enable_gqa sends CUDA SDPA to its math kernel (L x L scores)."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        calls.append(
            (query.shape[-3], key.shape[-3], kwargs["attn_mask"] is not None, kwargs["enable_gqa"])
        )
        return real(query, key, value, **kwargs)

    q, k, v = _tensors(1, 4, 2, 24)
    pos = torch.arange(24)[None]
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", recording):
        out = run_s2("sdpa", q, k, v, 8, pos, None, window=3)
    masked = [c for c in calls if c[2]]
    assert masked and all(hq == hk and not gqa for hq, hk, _, gqa in masked)
    ref = dense_attention(
        q, k, v, s2_allowed(pos, torch.ones(1, 24, dtype=torch.bool), 4, 8, 3), 8**-0.5
    )
    assert torch.allclose(out, ref, atol=1e-5)


def test_flash_path_casts_fp32_inputs_like_transformers():
    """fp32 q/k/v (QLoRA, fp32-upcast norms) reach flash-attn in the model's half dtype."""
    seen = []

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return varlen_contracts.flash_attn_varlen_func(q, k, v, *args, **kwargs)

    module = Attn(2).train()
    module.o_proj.to(torch.bfloat16)
    q, k, v = _tensors(1, 4, 2, 12)
    settings = S2Settings("flash_attention_2", 4, 0.25)
    fake = types.SimpleNamespace(flash_attn_varlen_func=recording)
    with mock.patch.dict(sys.modules, {"flash_attn": fake}):
        out, _ = s2_attention_forward(
            settings, module, q, k, v, None, position_ids=torch.arange(12)[None], scaling=0.35
        )
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("backend", "device", "dtype", "dropout", "expected"),
    [
        ("sdpa", "cpu", torch.bfloat16, 0.0, "sdpa (is_causal, per group)"),
        ("sdpa", "cuda", torch.bfloat16, 0.0, "torch.nn.attention.varlen.varlen_attn"),
        ("sdpa", "cuda", torch.float16, 0.0, "torch.nn.attention.varlen.varlen_attn"),
        ("sdpa", "cuda", torch.float32, 0.0, "sdpa (is_causal, per group)"),
        ("sdpa", "cuda", torch.bfloat16, 0.1, "sdpa (is_causal, per group)"),
        ("eager", "cuda", torch.bfloat16, 0.0, "eager (per group)"),
        ("flash_attention_2", "cuda", torch.float32, 0.0, "flash_attn_varlen_func"),
    ],
)
def test_kernel_choice(backend, device, dtype, dropout, expected):
    from longlora_plugin.s2.kernels import select_kernel

    assert select_kernel(backend, device, dtype, dropout).name == expected
