"""The benchmark scripts run: the GPU check's dry run on CPU (it is prepared for a short
device lease, so a broken script would waste the lease)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    ],
)
def test_demo_reach_refuses_a_bad_attention_spec(bad, capsys):
    from benchmarks.demo_reach import main

    with pytest.raises(SystemExit):
        main(["--attention", bad])
    assert f"--attention {bad!r}: expected full, window:W or window:W+S" in capsys.readouterr().err
