"""S2-Attn attention function against the independent dense reference (bare function)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from s2_reference import dense_attention, s2_allowed

from longlora_plugin.s2_attn import DeferredMask, S2Settings, s2_attention_forward
from longlora_plugin.s2_layout import regular_pieces, segments

BACKENDS = ["sdpa", "eager"]


class Attn(torch.nn.Module):
    """Stands in for a model's attention module (``training`` and the GQA ratio)."""

    def __init__(self, num_key_value_groups: int = 1):
        super().__init__()
        self.num_key_value_groups = num_key_value_groups


def run_s2(backend, q, k, v, group, position_ids, valid, window=None, training=True, builder=None):
    module = Attn(q.shape[1] // k.shape[1]).train(training)
    mask = DeferredMask(builder or (lambda **kw: None), {"attention_mask": valid})
    out, weights = s2_attention_forward(
        S2Settings(backend, group, 0.25),
        module,
        q,
        k,
        v,
        mask,
        position_ids=position_ids,
        scaling=q.shape[-1] ** -0.5,
        sliding_window=window,
        dropout=0.0,
    )
    assert weights is None
    return out


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
    seg = segments(pos, valid, group_size=4, shift=2)
    dests = torch.cat([b.dest for b in seg.buckets]).sort().values
    assert torch.equal(dests, valid.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(seg.token_index, dests)
    assert int(seg.cu_seqlens[-1]) == int(valid.sum())


def _varlen_stand_in(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
):
    """flash-attn's documented varlen contract in plain torch (flash-attn needs CUDA):
    causal attention inside each ``cu_seqlens`` span, keys at most ``window_size[0]`` back."""
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True):
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & ((i - j <= window_size[0]) if window_size[0] >= 0 else True)
        qs, ks, vs = (
            x[a:b].transpose(0, 1)
            for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        )
        scores = (qs @ ks.transpose(-1, -2)) * softmax_scale
        out[a:b] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_flash_varlen_plumbing_with_a_contract_stand_in(monkeypatch, window):
    """Our cu_seqlens / token order / window for flash-attn, checked through its contract."""
    import sys
    import types

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_varlen_stand_in)
    )
    pos = torch.cat([torch.arange(11), torch.arange(17), torch.arange(2)])[None].expand(2, -1)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 25:] = False
    q, k, v = _tensors(2, 6, 2, 30)
    out = run_s2("flash_attention_2", q, k, v, 6, pos, valid, window)
    ref = dense_attention(q, k, v, s2_allowed(pos, valid, 6, 6, window), 8**-0.5)
    keep = valid[:, :, None, None]
    assert torch.allclose(out * keep, ref * keep, atol=1e-5)
