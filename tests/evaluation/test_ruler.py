"""RULER-style tasks (``longlora_plugin/evaluation/ruler.py``, ``ruler_tasks.py``,
``ruler_prompts.py``, ``ruler_eval.py``): exact prompt lengths, needles at their depths,
RULER's scoring and summary rules, and the ``longlora eval ruler`` outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longlora_plugin.cli import main
from longlora_plugin.evaluation import ruler, ruler_tasks
from longlora_plugin.evaluation.ruler_eval import (
    effective_length,
    run,
    string_match_all,
    summarize,
)
from longlora_plugin.evaluation.ruler_prompts import sentences
from tests.support import retrievers

ESSAY_TEXT = " ".join(
    f"Sentence number {i} of the essay talks about topic {i % 7}, and then it ends."
    for i in range(400)
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _span(tokenizer, sample: ruler.Sample) -> str:
    return tokenizer.decode(sample.input_ids)


@pytest.mark.parametrize("length", [3000, 6000])
@pytest.mark.parametrize("task", list(ruler_tasks.TASKS))
def test_every_task_has_exactly_the_requested_length(tokenizer, task, length):
    essay = sentences(ESSAY_TEXT)
    sample = ruler.build_sample(task, tokenizer, length, "s", essay=essay)
    assert len(sample.input_ids) + sample.tokens_to_generate == length
    assert sample.input_ids[0] == tokenizer.bos_token_id
    text = _span(tokenizer, sample).lower()
    for reference in sample.references:  # every answer is in the prompt
        assert reference.lower() in text, (task, reference)
    again = ruler.build_sample(task, tokenizer, length, "s", essay=essay)
    assert again.input_ids == sample.input_ids  # deterministic in (task, length, seed)
    other = ruler.build_sample(task, tokenizer, length, "t", essay=essay)
    assert other.references != sample.references


def test_task_parameters_follow_ruler(tokenizer):
    tokens = {t.kind: t.tokens_to_generate for t in ruler_tasks.TASKS.values()}
    assert tokens == {
        "niah": 128,
        "variable_tracking": 30,
        "common_words_extraction": 120,
        "freq_words_extraction": 50,
    }
    multivalue = ruler.build_sample("niah_multivalue", tokenizer, 3000, 1, essay=["A b c."] * 9)
    assert len(multivalue.references) == 4 and len(multivalue.needle_positions) == 4
    multiquery = ruler.build_sample("niah_multiquery", tokenizer, 3000, 1, essay=["A b c."] * 9)
    assert len(multiquery.references) == 4
    assert "for " in _span(tokenizer, multiquery) and ", and " in _span(tokenizer, multiquery)
    single = _span(tokenizer, ruler.build_sample("niah_single_1", tokenizer, 2000, 1))
    assert "A special magic number is hidden" in single  # RULER's singular wording
    assert single.endswith("mentioned in the provided text is")
    uuids = ruler.build_sample("niah_multikey_3", tokenizer, 4000, 1)
    assert len(uuids.references[0]) == 36 and uuids.references[0].count("-") == 4
    vt = ruler.build_sample("vt", tokenizer, 2000, 1)
    assert len(vt.references) == ruler_tasks.VT_HOPS + 1
    assert f"VAR {vt.references[1]} = VAR {vt.references[0]}" in _span(tokenizer, vt)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, depth):
    """RULER's depth: the fraction of the haystack's units (here noise paragraphs) before
    the needle."""
    sample = ruler.build_sample("niah_single_1", tokenizer, 2500, 0, depths=[depth])
    start = sample.needle_positions[0]
    needle = tokenizer.decode(sample.input_ids[start:]).split("\n")[0]
    assert needle == f"One of the special magic numbers for {needle.split()[7]} is: " + (
        f"{sample.references[0]}."
    )
    units_before = tokenizer.decode(sample.input_ids[:start]).count("The grass is green.")
    units = _span(tokenizer, sample).count("The grass is")  # the last one may be cut
    assert units > 20
    assert abs(units_before - depth * units) <= 1, (units_before, units, depth)


def test_too_short_lengths_and_missing_essays_are_refused(tokenizer):
    with pytest.raises(ValueError, match="niah_single_1 at length 150: .* without haystack"):
        ruler.build_sample("niah_single_1", tokenizer, 150, 0)
    with pytest.raises(ValueError, match="needs text"):
        ruler.build_sample("niah_single_2", tokenizer, 3000, 0)
    with pytest.raises(ValueError, match="cwe at length 1000: .* needs about"):
        ruler.build_sample("cwe", tokenizer, 1000, 0)


def test_string_match_all_is_rulers_metric():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert string_match_all("the NUMBER is 123", ["123", "456"]) == 50.0
    assert string_match_all("ABC-def", ["abc-DEF"]) == 100.0  # case-insensitive
    assert string_match_all("", ["1"]) == 0.0
    assert string_match_all("12", ["123"]) == 0.0  # the whole reference must appear


def test_effective_length_and_regression_line():
    average = {1024: 95.0, 2048: 90.0, 4096: 80.0, 8192: 88.0}
    assert effective_length(average, 85.6) == 2048  # 8192 passes, but 4096 broke the run
    assert effective_length(average, 99.0) is None
    models = [
        {"name": "base", "kind": "model", "original_length": 2048},
        {"name": "longlora", "kind": "adapter", "original_length": 2048},
    ]
    results = [
        {"model": "base", "task": t, "length": n, "score": s}
        for t, scores in {"a": (100, 80, 0), "b": (90, 70, 0)}.items()
        for n, s in zip((1024, 2048, 4096), scores, strict=True)
    ] + [
        {"model": "longlora", "task": t, "length": n, "score": s}
        for t, scores in {"a": (100, 70, 70), "b": (90, 70, 60)}.items()
        for n, s in zip((1024, 2048, 4096), scores, strict=True)
    ]
    summary = summarize(models, results, 85.6, 0.9)
    assert summary["base"]["average"] == {1024: 95.0, 2048: 75.0, 4096: 0.0}
    assert summary["base"]["effective_length"] == 1024
    assert summary["longlora"]["score_at_original"] == 70.0
    assert summary["longlora"]["base_score_at_original"] == 75.0
    assert summary["longlora"]["relative_threshold"] == pytest.approx(63.0)
    assert summary["longlora"]["relative_effective_length"] == 4096  # 65 >= 63
    zero = [{**r, "score": 0.0} for r in results if r["model"] == "longlora"]
    summary = summarize(models, [r for r in results if r["model"] == "base"] + zero, 85.6, 0.9)
    assert summary["longlora"]["score_at_original"] == 0.0  # 0 at its own context:
    assert summary["longlora"]["relative_threshold"] is None  # no relative rule
    assert summary["longlora"]["relative_effective_length"] is None


def test_cli_writes_json_table_and_heatmap(tiny_llama: Path, tmp_path, capsys):
    essay = tmp_path / "essay.txt"
    essay.write_text(ESSAY_TEXT)
    out = tmp_path / "ruler"
    argv = ["eval", "ruler", "--model", f"base={tiny_llama}", "--model", f"pi={tiny_llama}"]
    argv += ["--rope", "pi=linear:2", "--lengths", "2500,3000", "--samples", "2"]
    argv += ["--tasks", "niah_single_1,niah_single_2,vt", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--data", str(essay), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "RULER score (string_match_all, %, 2 samples per cell, greedy)" in stdout
    assert "| pi | niah_single_2 |" in stdout and "Effective length" in stdout
    payload = json.loads((out / "ruler.json").read_text())
    assert payload["settings"]["tasks"] == ["niah_single_1", "niah_single_2", "vt"]
    assert len(payload["results"]) == 2 * 3 * 2 and len(payload["samples"]) == 2 * 3 * 2 * 2
    for row in payload["results"]:
        assert 0 <= row["score"] <= 100 and row["prefill_tokens_per_s"] > 0
    for record in payload["samples"]:
        assert record["prompt_tokens"] + ruler_tasks.TASKS[record["task"]].tokens_to_generate in (
            2500,
            3000,
        )
        assert record["prefill_tokens"] == record["prompt_tokens"]  # no haystack reused
    assert "| pi | 3000 | 6 |" in stdout  # the cost table: 3 tasks x 2 samples
    assert set(payload["summary"]) == {"base", "pi"}
    assert (out / "ruler.md").read_text() in stdout
    assert (out / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # without --data the essay tasks are skipped and said so
    assert main([*argv, "--out", str(tmp_path / "no-essay")]) == 0
    assert "essay tasks skipped: niah_single_2" in capsys.readouterr().out
    bad = ["eval", "ruler", "--model", f"a={tiny_llama}", "--lengths", "2500"]
    with pytest.raises(SystemExit):
        main([*bad, "--tasks", "niah_single_9", "--out", str(tmp_path / "x")])
    assert "unknown task(s) ['niah_single_9']" in capsys.readouterr().err


# ---------------------------------------------------------------------- one prefill, several questions
@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3"])
def test_questions_about_one_haystack_keep_the_exact_length(tokenizer, task):
    essay = sentences(ESSAY_TEXT)
    questions = ruler_tasks.max_questions(task) if task == "niah_multikey_1" else 5
    group = ruler.build_samples(task, tokenizer, 3000, "q", questions=questions, essay=essay)
    assert len(group) == questions
    shared = group[0].prefix_length
    assert shared > 0.9 * len(group[0].input_ids)
    references = set()
    for sample in group:
        assert len(sample.input_ids) + sample.tokens_to_generate == 3000
        assert sample.input_ids[:shared] == group[0].input_ids[:shared]
        text = tokenizer.decode(sample.input_ids[shared:])
        (key,) = {k for k in _keys_in(tokenizer, group[0]) if k in text}  # asks about one key
        needle = f"for {key} is: {sample.references[0]}."
        assert needle in tokenizer.decode(sample.input_ids[:shared])  # whose needle is there
        references.add(sample.references[0])
    assert len(references) == questions  # a different needle each
    # one question per haystack is RULER's sample, as build_sample makes it
    single = ruler.build_samples(task, tokenizer, 3000, "q", essay=essay)
    assert (
        single[0].input_ids == ruler.build_sample(task, tokenizer, 3000, "q", essay=essay).input_ids
    )
    assert single[0].prefix_length == 0


def _keys_in(tokenizer, sample: ruler.Sample) -> list[str]:
    import re

    return re.findall(r"magic \w+ for (\S+) is:", tokenizer.decode(sample.input_ids))


def test_questions_per_haystack_is_refused_where_the_task_has_one_question(tokenizer):
    with pytest.raises(ValueError, match=r"niah_single_1: questions per haystack 2 .* 1 to 1"):
        ruler.build_samples("niah_single_1", tokenizer, 3000, "q", questions=2)
    assert ruler_tasks.max_questions("niah_multivalue") == ruler_tasks.max_questions("vt") == 1


def test_reused_prefill_gives_the_answers_of_separate_prefills(tiny_llama: Path):
    import torch

    from longlora_plugin.evaluation.models import ModelSpec, load_eval_model
    from longlora_plugin.evaluation.ruler_eval import answer, answer_all

    item = load_eval_model(ModelSpec("tiny", str(tiny_llama)), dtype="float32", device="cpu")
    group = ruler.build_samples("niah_multikey_2", item.tokenizer, 1500, "r", questions=3)
    for sample in group:
        sample.tokens_to_generate = 12  # a short greedy answer, compared token for token
    reused = answer_all(item.model, item.tokenizer, group)
    alone = [answer(item.model, item.tokenizer, s) for s in group]
    assert [a.text for a in reused] == [a.text for a in alone]
    assert all(a.new_tokens == 12 for a in alone)  # a random model does not stop early
    shared = group[0].prefix_length
    assert reused[0].prefill_tokens == 1500 - 128
    assert [a.prefill_tokens for a in reused[1:]] == [1500 - 128 - shared] * 2
    # the logits of the first answer token agree, not only the argmax
    with torch.inference_mode():
        ids = torch.tensor([group[2].input_ids])
        full = item.model(input_ids=ids).logits[0, -1]
        cache = item.model(input_ids=ids[:, :shared], use_cache=True).past_key_values
        part = item.model(input_ids=ids[:, shared:], past_key_values=cache).logits[0, -1]
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


def test_cli_questions_per_haystack(tiny_llama: Path, tmp_path, capsys):
    out = tmp_path / "ruler"
    argv = ["eval", "ruler", "--model", f"base={tiny_llama}", "--lengths", "1500"]
    argv += ["--tasks", "niah_single_1,niah_multikey_2", "--samples", "4", "--device", "cpu"]
    argv += ["--questions-per-haystack", "4", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "ruler.json").read_text())
    haystacks = {r["task"]: r["haystacks"] for r in payload["results"]}
    assert haystacks == {"niah_single_1": 4, "niah_multikey_2": 1}
    assert payload["settings"]["questions_per_haystack"] == 4
    reused = [r for r in payload["results"] if r["task"] == "niah_multikey_2"][0]
    assert reused["prompt_tokens_per_s"] > 2 * reused["prefill_tokens_per_s"]


def test_model_trained_to_retrieve_solves_niah_and_untrained_model_does_not():
    """Through RULER's own prompts and scoring: a tiny Llama trained on ``niah_single_1``
    prompts (seeds ``train/<i>``; shipped, ``tests/support/retrievers.py``) answers new
    ones (seeds ``1/<i>``), its untrained twin none."""
    from longlora_plugin.evaluation.models import from_loaded

    torch.set_num_threads(1)
    model, untrained, tok = retrievers.load("niah")
    payload = run(
        [
            from_loaded("trained", model, tok, original_length=256),
            from_loaded("untrained", untrained, tok, original_length=256),
        ],
        lengths=[190, 195],
        tasks=["niah_single_1"],
        samples=10,
        seed=1,
        progress=False,
    )
    scores: dict[str, list[float]] = {}
    for row in payload["results"]:
        scores.setdefault(row["model"], []).append(row["score"])
    assert len(scores["trained"]) == len(scores["untrained"]) == 2  # no cell skipped
    assert sum(scores["trained"]) / 2 >= 80, payload["samples"]
    assert scores["untrained"] == [0.0, 0.0], payload["samples"]


def test_shortest_length_is_the_first_that_builds(tokenizer):
    shortest = ruler.shortest_length("niah_single_1", tokenizer)
    assert shortest is not None and shortest > 128  # the answer budget alone is 128
    ruler.build_sample("niah_single_1", tokenizer, shortest, "shortest")
    with pytest.raises(ValueError, match="the task without haystack takes"):
        ruler.build_sample("niah_single_1", tokenizer, shortest - 1, "shortest")
    assert ruler.shortest_length("niah_single_1", tokenizer, limit=shortest - 1) is None
