"""``longlora validate``: every stock config validates offline with its fixture
``config.json``; bad configs exit non-zero with the message training would raise."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longlora_plugin.cli import main as cli_main
from longlora_plugin.offline import OFFLINE_ENV
from tests.support.versions import AXOLOTL_021

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"
DEMO = ("quickstart-cpu.yml",)  # needs the demo's local model
STOCK = sorted(p for p in (REPO / "example_configs").glob("*.yml") if p.name not in DEMO)


def header_command(path: Path) -> list[str]:
    """The ``longlora validate ...`` command written in a config's header comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   longlora validate "))
    parts = []
    for line in lines[start:]:
        text = line.lstrip("#").strip()
        parts.append(text.rstrip("\\").strip())
        if not text.endswith("\\"):
            break
    argv = shlex.split(" ".join(parts))
    assert argv[:2] == ["longlora", "validate"]
    return argv[2:]


def header_peak(path: Path) -> float:
    header = re.sub(r"\n#\s*", " ", path.read_text(encoding="utf-8"))  # unwrap comment lines
    match = re.search(r"peak ([0-9.]+) GiB", header)
    assert match, f"{path.name}: no 'peak N GiB' estimate in the header"
    return float(match.group(1))


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # the configs name their DeepSpeed JSONs relative to it


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli_main(["validate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_every_model_has_a_fixture():
    for path in STOCK:
        argv = header_command(path)
        fixture = Path(argv[argv.index("--model-config") + 1])
        base = yaml.safe_load(path.read_text())["base_model"]
        assert fixture.name == base.rsplit("/", 1)[-1], path.name
        assert (REPO / fixture / "config.json").is_file(), fixture


@pytest.mark.parametrize("path", STOCK, ids=lambda p: p.stem)
def test_stock_config_validates_offline(capsys, path: Path):
    rc, out, err = run_cli(capsys, header_command(path))
    assert rc == 0, err
    cfg = yaml.safe_load(path.read_text())
    seq = cfg["sequence_len"]
    group = int(0.25 * seq)
    assert "Axolotl validation passed" in out
    attn = cfg["attn_implementation"]  # flash_attention_2 on GPU, sdpa in the CPU config
    assert f"S2-Attn: on, wraps {attn}, group size {group}, shift {group // 2}" in out
    assert re.search(rf"RoPE linear factor [0-9.]+ \(original \d+, target {seq}\)", out), out
    modules_line = next(line for line in out.splitlines() if "modules_to_save" in line)
    assert "'embed_tokens'" in modules_line and "norm'" in modules_line, modules_line
    assert re.search(r"^  LoRA: [1-9][0-9,]*$", out, flags=re.M), out
    assert "tokens per optimizer step:" in out and "memory estimate per GPU" in out
    # The header's estimate is the one validate prints (headers cannot go stale).
    peak = float(re.search(r"peak ([0-9.]+) of", out).group(1))
    assert peak == pytest.approx(header_peak(path), abs=0.05), out
    assert "-> fits" in out


EXPECTED = {
    "llama2-7b-32k": [
        "S2-Attn: on, wraps sdpa, group size 8192, shift 4096",
        "S2 kernel on cuda (bfloat16): unpacked and packed rows: "
        "torch.nn.attention.varlen.varlen_attn, both head halves in one call",
        "S2 kernel on cpu (float32): unpacked rows: sdpa (is_causal, per group)",
        "note: Axolotl's warning 'sample_packing & torch sdpa with bf16 is unsupported'",
        "RoPE linear factor 8.0 (original 4096, target 32768)",
        "max_position_embeddings: 4096 -> 32768",
        "  LoRA: 8,388,608",
        "  embed: 131,072,000",
        "  norm: 266,240",
        "  lm_head: 0",
        "tokens per optimizer step: 2,097,152",
        "DeepSpeed ZeRO-2, a100-80gb",
        "6,738,415,616 parameters",
    ],
    "llama2-7b-100k": [
        "RoPE linear factor 25.0 (original 4096, target 100000)",
        "max_position_embeddings: 4096 -> 102400",
        "group size 25000, shift 12500",
        "DeepSpeed ZeRO-3 with optimizer and parameter offload to CPU",
        "cross-entropy in 8 chunks",
    ],
    "llama2-13b-64k": ["RoPE linear factor 16.0 (original 4096, target 65536)", "ZeRO-3"],
    "llama2-70b-32k": [
        "  LoRA: 32,768,000",
        "8 kv heads",
        "DeepSpeed ZeRO-3 with optimizer and parameter offload to CPU",
    ],
    "llama2-70b-100k-cp8": [
        "group size 25000, shift 12500",
        "x 8 GPUs (1 context-parallel group of 8) = 8 sequences of 100000 tokens",
        "each row split over 8 GPUs (12500 tokens each",
        "note: longlora.context_parallel=8: each row split over 8 GPUs",
        "-> fits",
    ],
    "llama3-8b-64k": [
        "RoPE linear factor 8.0 (original 8192, target 65536)",
        "'rope_theta': 500000.0",
        "'rope_type': 'linear'",
    ],
    "mistral-7b-32k": [
        "RoPE linear factor 4.0 (original 8192, target 32768)",
        "sliding window 4096 < group 8192",
        "sliding window 4096",
    ],
    "smollm2-135m-32k": [
        "tied embeddings",
        "  lm_head: 0",
        "x 1 GPUs",
        "tokens per optimizer step: 262,144",
        "single GPU",
    ],
    "smollm2-135m-16k-cpu": [
        "RoPE linear factor 2.0 (original 8192, target 16384)",
        "group size 4096, shift 2048",
        "cross-entropy in 8 chunks",
        "tokens per optimizer step: 16,384",
    ],
    "llama2-7b-chat-longalpaca-32k-sft": ["meta-llama/Llama-2-7b-chat-hf", "(packed rows; up to)"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_resolved_settings(capsys, name: str):
    rc, out, err = run_cli(capsys, header_command(REPO / "example_configs" / f"{name}.yml"))
    assert rc == 0, err
    for fragment in EXPECTED[name]:
        assert fragment in out, f"{fragment!r} not in:\n{out}"


def test_quickstart_cpu_config_validates(capsys, tiny_model_factory):
    demo_base = tiny_model_factory("llama", max_position_embeddings=256)  # the demo's C0
    rc, out, err = run_cli(
        capsys,
        [
            "example_configs/quickstart-cpu.yml",
            "--model-config",
            str(demo_base),
            "--gpus-per-node",
            "1",
        ],
    )
    assert rc == 0, err
    assert "S2-Attn: on, wraps sdpa, group size 512, shift 256" in out
    assert "RoPE linear factor 4.0 (original 256, target 1024)" in out


# ------------------------------------------------------------------ bad configs
BASE = REPO / "example_configs" / "llama2-7b-32k.yml"
FIXTURE = str(FIXTURES / "Llama-2-7b-hf")


def bad_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(BASE.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        (
            {"longlora": {"group_size_ratio": 1.5}},
            ["longlora.group_size_ratio=1.5 is outside (0, 1]"],
        ),
        (
            {"longlora": {"rope": {"type": "ntk"}}},
            ["longlora.rope.type='ntk'", "linear, dynamic, yarn, llama3, none"],
        ),
        ({"longlora": {"group_size": 40000}}, ["longlora.group_size=40000", "sequence_len=32768"]),
        ({"s2_attention": True}, ["s2_attention=True", "removed S2-Attn"]),
        (
            {"unfrozen_parameters": ["model.embed_tokens"]},
            ["unfrozen_parameters", "longlora.trainable_params"],
        ),
        (
            {"attn_implementation": "sage"},
            ["attn_implementation='sage'", "longlora.s2_attn wraps only"],
        ),
        ({"deepspeed": "missing/zero2.json"}, ["deepspeed='missing/zero2.json': no such file"]),
        (
            {"context_parallel_size": 2, "attn_implementation": "flash_attention_2"},
            ["Axolotl's context_parallel_size=2 (ring attention)", "longlora.s2_attn: false"],
        ),
        ({"micro_batch_size": "one"}, ["micro_batch_size"]),
        # Axolotl's own messages, which differ by version
        (
            {"fsdp": ["full_shard"]},
            ["The top-level `fsdp` list is no longer supported"]
            if AXOLOTL_021
            else ["deepspeed and fsdp cannot be used together"],
        ),
    ],
)
def test_bad_config_exits_nonzero_with_message(capsys, tmp_path, changes, fragments):
    path = bad_config(tmp_path, **changes)
    rc, out, err = run_cli(capsys, [str(path), "--model-config", FIXTURE])
    assert rc == 1
    assert "validation passed" not in out
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"


def test_config_without_plugins_entry(capsys, tmp_path):
    """0.19 would drop the block silently: an error. 0.21 registers the installed plugin
    through its entry point: a note that the config needs the entry for 0.19."""
    path = bad_config(tmp_path, plugins=None)
    rc, out, err = run_cli(capsys, [str(path), "--model-config", FIXTURE])
    if AXOLOTL_021:
        assert rc == 0, err
        assert "S2-Attn: on, wraps sdpa, group size 8192" in out
        assert "note: plugins does not list longlora_plugin.LongLoRAPlugin" in out
    else:
        assert rc == 1
        assert "longlora block present but plugins does not list" in err


def test_same_message_as_training(capsys, tmp_path):
    """Axolotl's load_cfg (what `axolotl train` runs first) raises the message validate prints."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    path = bad_config(tmp_path, longlora={"group_size_ratio": 0, "rope": {"factor": 0.5}})
    rc, _, err = run_cli(capsys, [str(path), "--model-config", FIXTURE])
    assert rc == 1
    raw = yaml.safe_load(path.read_text())
    raw["base_model_config"] = FIXTURE
    with pytest.raises(ValueError) as info:
        load_cfg(DictDefault(copy.deepcopy(raw)))
    assert str(info.value) in err
    assert "longlora.rope.factor=0.5" in str(info.value)


def test_console_script_offline(tmp_path):
    """``python -m longlora_plugin validate`` in a fresh process, Hub access disabled."""
    env = {**OFFLINE_ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "longlora_plugin",
            "validate",
            "example_configs/mistral-7b-32k.yml",
            "--model-config",
            "tests/fixtures/model_configs/Mistral-7B-v0.1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RoPE linear factor 4.0 (original 8192, target 32768)" in proc.stdout


def test_llama3_cut_cross_entropy_advice_is_valid_as_written(capsys, tmp_path):
    """The llama3-8b-64k header's out-of-memory advice, applied as written, validates;
    adding the Cut Cross Entropy plugin next to chunked_cross_entropy does not (Axolotl
    accepts one cross-entropy option at a time)."""
    path = REPO / "example_configs" / "llama3-8b-64k.yml"
    header = re.sub(r"\n#\s*", " ", path.read_text(encoding="utf-8"))
    assert "delete the line `chunked_cross_entropy: true`" in header
    plugin = re.search(r"add `- ([\w.]+)` under `plugins:`", header).group(1)
    cfg = yaml.safe_load(path.read_text())
    both = {**cfg, "plugins": [*cfg["plugins"], plugin]}
    advised = {k: v for k, v in both.items() if k != "chunked_cross_entropy"}
    argv = header_command(path)[1:]
    for name, config in (("both", both), ("advised", advised)):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    rc, _, err = run_cli(capsys, [str(tmp_path / "both.yml"), *argv])
    assert rc == 1 and "chunked" in err, err
    rc, out, err = run_cli(capsys, [str(tmp_path / "advised.yml"), *argv])
    assert rc == 0, err
    assert "Axolotl validation passed" in out


def test_docs_table_lists_every_config():
    doc = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    for path in [*STOCK, *(REPO / "example_configs" / name for name in DEMO)]:
        assert f"| `{path.name}` |" in doc, path.name


def test_context_parallel_estimate_fits_70b_at_100k(capsys, tmp_path):
    """Llama-2-70B at 100k tokens per row: gradient-checkpoint activations alone exceed an
    80 GB GPU; split over 8 GPUs (--context-parallel 8) the estimate fits."""
    cfg = yaml.safe_load((REPO / "example_configs" / "llama2-70b-32k.yml").read_text())
    cfg["sequence_len"] = 102400
    path = tmp_path / "llama2-70b-100k.yml"
    path.write_text(yaml.safe_dump(cfg))
    fixture = str(FIXTURES / "Llama-2-70b-hf")
    rc, out, _ = run_cli(capsys, [str(path), "--model-config", fixture])
    assert rc == 0 and "-> DOES NOT FIT" in out
    whole = float(re.search(r"^  checkpoints: ([0-9.]+)$", out, flags=re.M).group(1))
    assert whole == pytest.approx(80 * 102400 * 8192 * 2 / 2**30, abs=0.01)  # 125 GiB
    rc, out, _ = run_cli(capsys, [str(path), "--model-config", fixture, "--context-parallel", "8"])
    assert rc == 0 and "-> fits" in out, out
    split = float(re.search(r"^  checkpoints: ([0-9.]+)$", out, flags=re.M).group(1))
    assert split == pytest.approx(whole / 8, abs=0.01)
    assert "(1 context-parallel group of 8) = 8 sequences of 102400 tokens" in out
    assert "each row split over 8 GPUs (12800 tokens each" in out
    assert "--context-parallel 8: a what-if estimate (the config has" in out
    rc, _, err = run_cli(capsys, [str(path), "--model-config", fixture, "--context-parallel", "3"])
    assert rc == 1 and "--context-parallel 3: must be >= 1 and divide the 8 GPUs" in err


def header_gpu(path: Path) -> str:
    """The GPU type the config's header command estimates for (``--gpu``, or the CLI's
    default): the GPU the config states it fits."""
    import argparse

    from longlora_plugin.cli import validate as validate_cli

    argv = header_command(path)
    if "--gpu" in argv:
        return argv[argv.index("--gpu") + 1]
    return validate_cli.add_parser(argparse.ArgumentParser().add_subparsers()).get_default("gpu")


LONG = [p for p in STOCK if yaml.safe_load(p.read_text())["sequence_len"] >= 65536]
HEADER_TERMS = {"the logits and loss": "logits and loss"}


def test_long_configs_fit_their_gpu_with_the_margin(capsys):
    """Every 64k-and-longer stock config: the estimate x1.4 (the paper's measured peaks
    are up to 1.4x it) fits the GPU its header command names, and the header states the
    estimate, the x1.4 figure and the dominant term that validate prints."""
    from longlora_plugin.memory import GPUS, MARGIN

    assert MARGIN == 1.4
    assert sorted(p.stem for p in LONG) == [
        "llama2-13b-64k",
        "llama2-70b-100k-cp8",
        "llama2-7b-100k",
        "llama2-7b-64k",
        "llama3-8b-64k",
    ]
    for path in LONG:
        rc, out, err = run_cli(capsys, header_command(path))
        assert rc == 0, err
        peak = float(re.search(r"peak ([0-9.]+) of", out).group(1))
        margin = re.search(r"; x1\.4 ([0-9.]+) -> fits with the margin", out).group(1)
        gpu_gib = GPUS[header_gpu(path)][0]
        assert float(margin) == pytest.approx(peak * MARGIN, abs=0.1)
        assert float(margin) <= gpu_gib, (path.name, margin)
        header = re.sub(r"\n#\s*", " ", path.read_text(encoding="utf-8"))
        assert f"peak {peak:.1f} GiB, x1.4 = {margin} GiB of {gpu_gib:.0f}" in header, path.name
        term, size = re.search(r"dominant term: (.+?) ([0-9.]+) \(", out).groups()
        named, stated = re.search(r"Dominant term: (.+?), ([0-9.]+) GiB", header).groups()
        assert HEADER_TERMS.get(named, named) == term or (
            term == "checkpoints" and named.startswith("the checkpointed layer inputs")
        ), (path.name, named, term)
        assert float(stated) == pytest.approx(float(size), abs=0.051), path.name


def test_suggested_line_shrinks_the_dominant_term(capsys, tmp_path):
    """The advice validate prints for llama2-7b-64k (checkpoints dominate), pasted into the
    YAML as written, passes Axolotl's validation and shrinks that term 16 -> 2.5 GiB."""
    path = REPO / "example_configs" / "llama2-7b-64k.yml"
    argv = header_command(path)
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("  dominant term: checkpoints"))
    pasted = re.search(r"to shrink it: add `([^`]+)`", line).group(1)
    assert pasted == "activation_offloading: true"
    cfg = {**yaml.safe_load(path.read_text()), **yaml.safe_load(pasted)}
    (tmp_path / "advised.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, out, err = run_cli(capsys, [str(tmp_path / "advised.yml"), *argv[1:]])
    assert rc == 0, err
    assert re.search(r"^  checkpoints: 2\.50$", out, flags=re.M), out
    assert "activation_offloading: true: checkpointed layer inputs in CPU memory" in out
