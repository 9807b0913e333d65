"""Long-context evaluation (``longlora_plugin.evaluation``, ``longlora eval``) on tiny
local models, in-process, CPU.

Perplexity is checked against independent computations from the model's own logits
(``model(...).logits`` / ``model(..., labels=...)``), the passkey prompt against its
stated tolerance, retrieval against a tiny model trained (plain torch, shipped:
``tests/support/retrievers.py``) to copy the key versus the same model untrained, and the CLI against the files it must write.
Runs on adapter and merged directories from a real ``axolotl train`` live in
``test_plugin_train.py``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from demo.tiny_models import sample_text
from longlora_plugin.cli import main
from longlora_plugin.cli.eval import model_specs
from longlora_plugin.config import LongLoRAConfigError, parse_longlora
from longlora_plugin.evaluation import passkey as pk
from longlora_plugin.evaluation import perplexity as pp
from longlora_plugin.evaluation.loss import IGNORE_INDEX, token_nll
from longlora_plugin.evaluation.models import (
    ModelSpec,
    RopeOverride,
    load_eval_model,
    load_tokenizer,
)
from longlora_plugin.evaluation.runner import run_passkey
from longlora_plugin.evaluation.texts import TextSourceError, load_texts
from tests.support import retrievers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama(tiny_llama: Path):
    spec = ModelSpec("tiny", str(tiny_llama))
    return load_eval_model(spec, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(3)
    return [sample_text(rng, rng.randint(10, 60)) for _ in range(6)]


# ---------------------------------------------------------------------- perplexity
def test_window_mean_equals_direct_cross_entropy(llama, docs):
    tok, model = llama.tokenizer, llama.model
    stream = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    length, stride = 40, 16
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - length, stride):
            ids = torch.tensor([stream[start : start + length]])
            target = torch.tensor(stream[start + 1 : start + length + 1])
            losses.append(F.cross_entropy(model(input_ids=ids).logits[0], target).item())
    expected = math.exp(sum(losses) / len(losses))

    windows = pp.build_windows(tok, docs, convention=pp.WINDOW_MEAN, length=length, stride=stride)
    result = pp.evaluate(model, windows, batch_size=3, chunk_tokens=16)
    assert result.windows == len(losses) > 3
    assert result.scored_tokens == len(losses) * length
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.tokens_per_s > 0


def test_sliding_window_equals_hf_labels_loss(llama, docs):
    """Reference: Hugging Face's strided perplexity with ``labels`` (prefix masked with
    -100, the model shifts), token-weighted over documents."""
    tok, model = llama.tokenizer, llama.model
    length, stride = 24, 10
    total, count, expected_tokens = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]
            if len(ids) < length:
                continue
            expected_tokens += len(ids) - 1
            prev_end = 0
            for begin in range(0, len(ids), stride):
                end = min(begin + length, len(ids))
                trg = end - prev_end
                inputs = torch.tensor([ids[begin:end]])
                labels = inputs.clone()
                labels[:, :-trg] = -100
                n = int((labels[:, 1:] != -100).sum())
                total += model(input_ids=inputs, labels=labels).loss.item() * n
                count += n
                prev_end = end
                if end == len(ids):
                    break
    assert count == expected_tokens  # every token but BOS scored exactly once
    windows = pp.build_windows(
        tok, docs, convention=pp.SLIDING_WINDOW, length=length, stride=stride
    )
    result = pp.evaluate(model, windows, batch_size=4)
    assert result.scored_tokens == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_chunked_loss_equals_unchunked_and_logits(llama):
    model = llama.model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 50), generator=gen)
    targets = torch.randint(3, model.config.vocab_size, (2, 50), generator=gen)
    targets[0, :7] = IGNORE_INDEX
    targets[1, 30:] = IGNORE_INDEX
    chunked = token_nll(model, ids, targets, chunk_tokens=7)
    unchunked = token_nll(model, ids, targets, chunk_tokens=None)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    direct = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(2, 50)
    assert torch.allclose(chunked, unchunked, atol=1e-6)
    assert torch.allclose(chunked, direct, atol=1e-5)
    assert (chunked[targets == IGNORE_INDEX] == 0).all()


def test_max_windows_takes_evenly_spaced_windows():
    assert pp.window_mean_starts(1000, 100, 256) == [0, 256, 512, 768]
    assert pp.window_mean_starts(1000, 100, 100, max_windows=3) == [0, 400, 800]
    assert pp.window_mean_starts(100, 100, 256) == []
    assert pp.sliding_spans(10, 4, 3) == [(0, 4, 4), (3, 7, 3), (6, 10, 3)]


# ---------------------------------------------------------------------- passkey prompt
@pytest.mark.parametrize("length", [260, 400, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_length_and_depth(llama, length, depth):
    tok = llama.tokenizer
    tol = pk.tolerance(tok)
    prompt = pk.build_prompt(tok, length, depth, "31415")
    assert abs(prompt.n_tokens - length) <= tol, (prompt.n_tokens, length, tol)
    assert prompt.text.startswith(pk.TASK + "\n")
    assert prompt.text.endswith("\n" + pk.QUESTION)
    assert prompt.text.count("31415") == 2
    # The key line starts where the requested share of the filler is behind it.
    fixed = pk.min_length(tok, "31415")
    start = len(tok(pk.TASK + "\n")["input_ids"])
    wanted = start + depth * (prompt.n_tokens - fixed)
    assert abs(prompt.key_position - wanted) <= tol, (prompt.key_position, wanted)
    key_line = tok.decode(prompt.input_ids[prompt.key_position :])
    assert key_line.lstrip().startswith("The pass key is 31415.")


def test_passkey_prompt_rejects_bad_input(llama):
    with pytest.raises(ValueError, match="depth"):
        pk.build_prompt(llama.tokenizer, 500, 1.5, "7")
    with pytest.raises(ValueError, match="shorter than the prompt"):
        pk.build_prompt(llama.tokenizer, 20, 0.5, "7")


# ---------------------------------------------------------------------- passkey retrieval
@pytest.fixture(scope="module")
def copier():
    """``(trained, untrained, shortest prompt)``: the shipped tiny Llama trained (plain
    torch, ``tests/support/retrievers.py``) to copy the passkey, and its untrained twin."""
    from longlora_plugin.evaluation.models import from_loaded

    model, untrained, tok = retrievers.load("copier")
    return (
        from_loaded("copier", model, tok, original_length=256),
        from_loaded("random", untrained, tok, original_length=256),
        pk.min_length(tok),
    )


def test_model_trained_to_copy_retrieves_and_random_model_does_not(copier):
    trained, untrained, shortest = copier
    payload = run_passkey(
        [trained, untrained],
        lengths=[shortest + 10, shortest + 30],
        depths=[0.0, 0.5, 1.0],
        trials=4,
        progress=False,
    )
    acc: dict[str, list[float]] = {}
    for row in payload["results"]:
        acc.setdefault(row["model"], []).append(row["accuracy"])
    mean = {name: sum(v) / len(v) for name, v in acc.items()}
    assert mean["copier"] >= 0.8, payload["trials"]
    assert mean["random"] == 0.0, payload["trials"]
    for record in payload["trials"]:
        assert record["correct"] == (record["answer"] == record["passkey"])


# ---------------------------------------------------------------------- inputs
def test_load_texts_sources(tmp_path: Path):
    (tmp_path / "one.txt").write_text("first document")
    docs_dir = tmp_path / "dir"
    (docs_dir / "sub").mkdir(parents=True)
    (docs_dir / "b.txt").write_text("bravo")
    (docs_dir / "sub" / "a.md").write_text("alpha")
    (docs_dir / "skip.bin").write_text("ignored")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "x y"}\n\n{"body": ""}\n{"body": "z"}\n')
    assert load_texts(tmp_path / "one.txt") == ["first document"]
    assert load_texts(docs_dir) == ["bravo", "alpha"]
    assert load_texts(jsonl, text_field="body") == ["x y", "z"]
    assert load_texts(jsonl, text_field="body", max_docs=1) == ["x y"]
    with pytest.raises(TextSourceError, match="no field 'text'"):
        load_texts(jsonl)

    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"]}),
        }
    ).save_to_disk(str(saved))
    assert load_texts(saved) == ["e1"]
    assert load_texts(saved, split="train") == ["t1", "t2"]
    with pytest.raises(TextSourceError, match="neither a readable file"):
        load_texts(tmp_path / "missing-dataset")


def test_model_and_rope_arguments():
    specs = model_specs(["base=/m", "pi=/m", "/x/ad/"], ["pi=linear:4"])
    assert specs == [
        ModelSpec("base", "/m"),
        ModelSpec("pi", "/m", RopeOverride("linear", 4.0)),
        ModelSpec("ad", "/x/ad/"),
    ]
    assert all(
        s.rope == RopeOverride("yarn", 2.0) for s in model_specs(["a=/1", "b=/2"], ["yarn:2"])
    )
    for bad in ("linear", "cubic:2", "linear:0.5"):
        with pytest.raises(ValueError, match="--rope"):
            RopeOverride.parse(bad)
    with pytest.raises(ValueError, match="no --model named"):
        model_specs(["a=/1"], ["b=linear:2"])
    with pytest.raises(ValueError, match="unique"):
        model_specs(["a=/1", "a=/2"], None)


def test_interpolation_only_equals_rope_parameters_at_load(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    pi = load_eval_model(
        ModelSpec("pi", str(tiny_llama), RopeOverride("linear", 4.0)), dtype="float32", device="cpu"
    )
    assert pi.kind == "interpolation-only"
    assert pi.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert (pi.original_length, pi.scaled_length, pi.trained_length) == (64, 256, None)
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_llama,
        dtype=torch.float32,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ).eval()
    plain = load_eval_model(ModelSpec("base", str(tiny_llama)), dtype="float32", device="cpu")
    ids = torch.randint(3, 100, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = pi.model(input_ids=ids).logits
        assert torch.equal(out, reference(input_ids=ids).logits)
        assert (out - plain.model(input_ids=ids).logits).abs().max() > 1e-3
    assert plain.kind == "model" and plain.trained_length is None


def test_eval_config_block():
    cfg = parse_longlora({"eval": {"ppl_lengths": [64, 128], "data": "d.jsonl"}}).eval
    assert cfg.conventions == ["window-mean", "sliding-window"]
    assert (cfg.stride, cfg.max_windows, cfg.passkey_trials) == (256, 32, 10)
    assert parse_longlora({}).eval is None
    during = parse_longlora({"eval": {"every_n_steps": 50}}).eval  # no end-of-run eval
    assert (during.every_n_steps, during.progress_samples) == (50, 4)
    cases = {
        "neither ppl_lengths, passkey_lengths nor every_n_steps": {},
        "longlora.eval.every_n_steps=0": {"every_n_steps": 0},
        "no data": {"ppl_lengths": [64]},
        r"longlora.eval.passkey_depths=\[0.5, 2\]": {
            "passkey_lengths": [64],
            "passkey_depths": [0.5, 2],
        },
        "longlora.eval.conventions": {"passkey_lengths": [64], "conventions": ["paper"]},
        "longlora.eval.ppl_lengths": {"ppl_lengths": [1], "data": "x"},
        "longlora.eval.bogus: unknown key": {"passkey_lengths": [64], "bogus": 1},
    }
    for message, block in cases.items():
        with pytest.raises(LongLoRAConfigError, match=message):
            parse_longlora({"eval": block})


# ---------------------------------------------------------------------- CLI outputs
def test_cli_writes_json_table_and_plot(tiny_llama: Path, text_dataset: Path, tmp_path, capsys):
    out = tmp_path / "ppl"
    rc = main(
        [
            "eval",
            "ppl",
            "--model",
            f"base={tiny_llama}",
            "--model",
            f"pi4={tiny_llama}",
            "--rope",
            "pi4=linear:4",
            "--data",
            str(text_dataset),
            "--lengths",
            "32,64,128",
            "--stride",
            "64",
            "--max-windows",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
        + ["--out", str(out)]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "Perplexity, window-mean convention" in stdout
    assert "Perplexity, sliding-window convention" in stdout
    assert "| pi4 |" in stdout
    payload = json.loads((out / "ppl.json").read_text())
    assert set(payload["conventions"]) == {"window-mean", "sliding-window"}
    assert [m["name"] for m in payload["models"]] == ["base", "pi4"]
    assert payload["models"][1]["kind"] == "interpolation-only"
    assert len(payload["results"]) == 2 * 2 * 3
    for row in payload["results"]:
        assert row["ppl"] is not None and math.isfinite(row["ppl"]), row
        assert 1 <= row["windows"] <= 3
    assert (out / "ppl.md").read_text() in stdout
    assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "passkey"
    shortest = pk.min_length(load_tokenizer(str(tiny_llama)))
    rc = main(
        [
            "eval",
            "passkey",
            "--model",
            f"base={tiny_llama}",
            "--lengths",
            f"{shortest + 10},{shortest + 40}",
        ]
        + ["--depths", "0,1", "--trials", "2", "--no-progress", "--out", str(out)]
    )
    assert rc == 0
    assert "Passkey retrieval accuracy" in capsys.readouterr().out
    payload = json.loads((out / "passkey.json").read_text())
    assert len(payload["results"]) == 2 * 2 and len(payload["trials"]) == 2 * 2 * 2
    assert {r["accuracy"] for r in payload["results"]} <= {0.0, 0.5, 1.0}
    assert (out / "passkey.md").is_file()
    assert (out / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = ["eval", "ppl", "--model", f"a={tiny_llama}", "--rope", "b=linear:2", "--lengths", "32"]
    assert main([*bad, "--data", str(text_dataset), "--out", str(tmp_path / "x")]) == 2
    assert "no --model named 'b'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(retrievers.RECIPES))
def test_shipped_retrievers_are_what_their_recipe_trains(name, tmp_path):
    """The recipe still runs (a few steps here) and builds the shipped tokenizer and the
    prompts the shipped model was trained for."""
    target = retrievers.train(name, tmp_path, steps=3)
    fresh = json.loads((target / "recipe.json").read_text())
    shipped = json.loads((retrievers.FIXTURES / name / "recipe.json").read_text())
    assert fresh["fingerprint"] == shipped["fingerprint"]
    assert (target / "tokenizer.json").read_text() == (
        retrievers.FIXTURES / name / "tokenizer.json"
    ).read_text()
    assert len(fresh["loss_every_50_steps"]) == 2 and shipped["recipe"]["steps"] >= 400
