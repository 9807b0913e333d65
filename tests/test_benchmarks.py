"""The benchmark scripts run: the GPU check's dry run on CPU (it is prepared for a short
device lease, so a broken script would waste the lease)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
