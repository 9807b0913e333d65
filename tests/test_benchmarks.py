"""The benchmark scripts run: the GPU check's dry run on CPU (it is prepared for a short
device lease, so a broken script would waste the lease)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--smoke",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads(out.read_text())
    sections = data["sections"]
    expected = {
        "preflight",
        "numerics_function",
        "numerics_models",
        "eval_identity",
        "launches",
        "memory_features",
        "speed",
    }
    assert set(sections) == expected
    assert not [name for name, entry in sections.items() if "error" in entry]
    for name in ("numerics_function", "numerics_models", "eval_identity"):
        assert sections[name]["passed"] > 0 and sections[name]["failed"] == 0, name
    rows = sections["speed"]["rows"]
    assert rows and not [row for row in rows if "error" in row]
    assert {row["model"] for row in rows} == {"SmolLM2-135M", "Llama-2-7B-2L", "bench-2L-h256"}
    assert all(row["eval_bit_identical"] for row in rows)
    assert len(sections["launches"]["rows"]) == 4
    # GPU-only features: on CPU each case runs its reference half (the S2 model without
    # the feature) and is skipped
    features = sections["memory_features"]["cases"]
    assert [c["feature"] for c in features] == [
        "activation_offloading",
        "cut_cross_entropy",
        "liger",
    ]
    for case in features:
        assert case["passed"] is None and "error" not in case, case
        assert case["loss_without"] != case["loss_full_attention"], case  # S2 was on


def _dense_limited(query, key, value, window, sink):
    """Independent reference: explicit scores, -inf outside the allowed keys, softmax."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    out = torch.zeros_like(query)
    for i in range(q_len):
        pos = k_len - q_len + i
        allowed = torch.tensor([j <= pos and (pos - j < window or j < sink) for j in range(k_len)])
        scores = (query[..., i : i + 1, :] @ key.transpose(-1, -2)) / query.shape[-1] ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., i : i + 1, :] = scores.softmax(-1) @ value
    return out


@pytest.mark.parametrize("q_len", [9, 1])  # prefill, and one decoding step with the KV cache
@pytest.mark.parametrize(("window", "sink"), [(3, 0), (3, 2), (16, 0)])
def test_demo_reach_attention_equals_a_dense_reference(q_len, window, sink):
    from benchmarks.demo_reach import limited_sdpa

    torch.manual_seed(0)
    query = torch.randn(2, 4, q_len, 8)
    key, value = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)  # 2 kv heads for 4
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)  # what a layer carries
    out, _ = limited_sdpa(window, sink)(module, query, key, value, None, scaling=8**-0.5)
    expected = _dense_limited(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), window, sink
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_demo_reach_window_through_a_real_model():
    """Through transformers' dispatch: in a one-layer model with a 4-token window, token 0
    no longer reaches positions >= 4; with a 1-token sink it does; a window longer than
    the row gives the model's own sdpa logits."""
    from transformers import AutoModelForCausalLM

    from benchmarks.demo_reach import set_attention
    from demo.tiny_models import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=64, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 64, (1, 12))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 64

    def logits(x):
        with torch.no_grad():
            return model(input_ids=x).logits

    full = logits(ids)
    set_attention(model, "window:4")
    torch.testing.assert_close(logits(ids)[:, 4:], logits(other)[:, 4:])
    assert not torch.allclose(logits(ids)[:, :4], logits(other)[:, :4])
    set_attention(model, "window:4+1")
    assert not torch.allclose(logits(ids)[:, 4:], logits(other)[:, 4:])
    set_attention(model, "window:64")
    torch.testing.assert_close(logits(ids), full, atol=1e-5, rtol=1e-5)
    set_attention(model, "full")
    assert model.config._attn_implementation == "sdpa"


def test_demo_reach_window_on_chosen_layers_only():
    """``window:W@L``: in a two-layer model, the window on layer 1 only leaves layer 0's
    output (its hidden state) as under full attention and changes the logits; on both
    layers it equals ``window:W``."""
    from transformers import AutoModelForCausalLM

    from benchmarks.demo_reach import set_attention
    from demo.tiny_models import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=64, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, 64, (1, 12))

    def run(spec):
        set_attention(model, spec)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[1], out.logits

    full_h1, full_logits = run("full")
    late_h1, late_logits = run("window:4@1")
    torch.testing.assert_close(late_h1, full_h1)
    assert not torch.allclose(late_logits, full_logits)
    early_h1, _ = run("window:4@0")
    assert not torch.allclose(early_h1, full_h1)
    torch.testing.assert_close(run("window:4@0,1")[1], run("window:4")[1])


@pytest.mark.parametrize(
    "bad",
    [
        "window",
        "window:",
        "window:x",
        "window:0",
        "window:4+",
        "window:4+0",
        "band:4",
        "window:4+y",
        "window:4@",
        "window:4@1,",
        "window:4@x",
    ],
)
def test_demo_reach_refuses_a_bad_attention_spec(bad, capsys):
    from benchmarks.demo_reach import main

    with pytest.raises(SystemExit):
        main(["--attention", bad])
    assert f"--attention {bad!r}: expected full, window:W, window:W+S or window:W@L1,L2" in (
        capsys.readouterr().err
    )


def test_demo_frequencies_sum_to_the_real_attention():
    """The captured rotated queries and keys of a real two-layer Llama (GQA 4/2 heads,
    linear RoPE x4), split per frequency and summed, are the logits of layer 1: their
    causal softmax equals transformers' eager attention probabilities; the half-periods
    are pi / inv_freq with the interpolation."""
    from transformers import AutoModelForCausalLM

    from benchmarks.demo_frequencies import captured_qk, frequency_logits, half_periods
    from demo.tiny_models import tiny_config

    torch.manual_seed(0)
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=64, rope_parameters=rope)
    ).eval()
    ids = torch.randint(3, 64, (1, 20))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids, output_attentions=True).attentions[1][0]  # [H, L, L]
    with captured_qk(model, {1}) as store, torch.no_grad():
        model(input_ids=ids)
    assert model.config._attn_implementation == "eager"  # set back
    got = store[1]
    assert got["groups"] == 2 and got["key"].shape[1] == 2
    positions = torch.arange(20)
    parts = frequency_logits(got["query"][0], got["key"][0], got["scaling"], 2, positions)
    assert parts.shape == (4, 20, 20, 8)  # head_dim 16: 8 frequencies
    logits = parts.sum(-1).masked_fill(positions[None, :] > positions[:, None], float("-inf"))
    torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-5, rtol=1e-4)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16) / 4.0
    assert half_periods(model) == pytest.approx((torch.pi / inv_freq).tolist(), rel=1e-5)


def test_demo_frequencies_pairs_the_rotary_planes():
    """One constant vector rotated by transformers' RoPE at every position: frequency i's
    contribution at distance d is scaling * (x_i^2 + x_{i+D/2}^2) * cos(inv_freq_i * d),
    which only the rotate_half pairing (i with i + D/2) gives."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from benchmarks.demo_frequencies import frequency_logits

    torch.manual_seed(0)
    dim, length = 8, 12
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x = torch.randn(dim).expand(1, 1, length, dim)
    q, k = apply_rotary_pos_emb(x, x, cos[None], sin[None])
    positions = torch.tensor([length - 1])
    parts = frequency_logits(q[0], k[0], 0.5, 1, positions)[0, 0]  # [keys, frequencies]
    planes = x[0, 0, 0, : dim // 2] ** 2 + x[0, 0, 0, dim // 2 :] ** 2
    distance = (length - 1 - torch.arange(length)).float()
    expected = 0.5 * planes[None, :] * torch.cos(distance[:, None] * inv_freq[None, :])
    torch.testing.assert_close(parts, expected, atol=1e-5, rtol=1e-5)


def test_demo_frequencies_bins_and_far_flip():
    """by_distance averages each (query, key) pair into its distance bin (causal pairs
    only, by hand here); attention_mass bins the causal softmax (summing to 1 when the
    bins cover every distance); far_flip takes the largest rise between two bins."""
    from benchmarks.demo_frequencies import attention_mass, by_distance, far_flip

    torch.manual_seed(0)
    parts = torch.randn(2, 3, 10, 4)  # heads, queries, keys, frequencies
    positions = torch.tensor([5, 7, 9])
    bins = (0, 2, 6, 10)
    table = by_distance(parts, positions, bins)
    assert table.shape == (2, 4, 3)
    for b, (lo, hi) in enumerate(pairwise(bins)):
        pairs = [
            (q, k) for q, t in enumerate(positions.tolist()) for k in range(10) if lo <= t - k < hi
        ]
        assert pairs
        manual = torch.stack([parts[:, q, k] for q, k in pairs]).mean(0)
        torch.testing.assert_close(table[..., b], manual)
    mass = attention_mass(parts, positions, bins)
    expected = torch.zeros(2, 3)
    logits = parts.sum(-1)
    for q, t in enumerate(positions.tolist()):
        probs = logits[:, q, : t + 1].softmax(-1)  # the causal keys 0..t
        for b, (lo, hi) in enumerate(pairwise(bins)):
            keys = [k for k in range(t + 1) if lo <= t - k < hi]
            expected[:, b] += probs[:, keys].sum(-1) / len(positions)
    torch.testing.assert_close(mass, expected)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2))
    head = torch.tensor([[0.0, -1.0, 0.5], [0.0, -0.2, 1.5], [0.0, 0.3, 0.1]])
    rise, frequency = far_flip(head, 1, 2)
    assert (round(rise, 6), frequency) == (1.7, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bins", "0,8,8"], "--bins '0,8,8': expected increasing non-negative integers"),
        (["--bins", "5"], "--bins '5': expected increasing"),
        (["--flip", "0-8:8-99"], "--flip '0-8:8-99': both sides must be bins of --bins"),
    ],
)
def test_demo_frequencies_refuses_bad_arguments(args, message, capsys):
    from benchmarks.demo_frequencies import main

    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err


def test_demo_ablations_row_config_for_another_base(tmp_path, monkeypatch):
    """``--base``: a row's config trains that model, into its own folder, with its own
    tokenized data; the row's changes merge into the shipped ``longlora`` block, which
    still validates; without it the row trains the demo's base model."""
    import yaml

    from benchmarks import demo_ablations as ablations
    from longlora_plugin.config import LongLoRAConfig

    monkeypatch.setattr(ablations, "OUT", tmp_path)
    shipped = yaml.safe_load(ablations.CONFIG.read_text())
    base = tmp_path / "base3600"
    path = ablations.row_config("full", {"longlora": {"s2_attn": False}}, 800, 3, base)
    cfg = yaml.safe_load(path.read_text())
    assert path == tmp_path / "base3600" / "full.yml"
    assert cfg["base_model"] == str(base)
    assert cfg["output_dir"] == str(tmp_path / "base3600" / "full")
    assert cfg["dataset_prepared_path"] == str(tmp_path / "prepared-base3600")
    assert (cfg["max_steps"], cfg["seed"]) == (800, 3)
    assert cfg["longlora"] == {**shipped["longlora"], "s2_attn": False}
    assert LongLoRAConfig.model_validate(cfg["longlora"]).s2_attn is False

    default = yaml.safe_load(ablations.row_config("s2", {}, None).read_text())
    assert default["base_model"] == shipped["base_model"]
    assert default["output_dir"] == str(tmp_path / "s2")
    assert default["dataset_prepared_path"] == str(tmp_path / "prepared")


def test_demo_ablations_refuses_another_base_into_the_demos_results(tmp_path, monkeypatch, capsys):
    """``--base`` without ``--out`` / ``--png`` would overwrite the shipped rows: refused
    before anything trains, naming the option and the file."""
    from benchmarks import demo_ablations as ablations

    monkeypatch.setattr(sys, "argv", ["demo_ablations", "--base", str(tmp_path / "base3600")])
    with pytest.raises(SystemExit) as exit_info:
        ablations.main()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"--base {tmp_path / 'base3600'}" in message and "demo_ablations.json" in message
