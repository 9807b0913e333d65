"""The demo's text handling: normalisation, held-out split, training documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.text import (
    DemoTextError,
    chunk_paragraphs,
    load_demo_text,
    normalize,
    write_training_jsonl,
)


def _book(tag: str, paragraphs: int = 30) -> str:
    """Hard-wrapped text whose every paragraph carries ``tag``."""
    return "\n\n".join(
        f"{tag} paragraph {i} starts here\nand wraps onto a second line {tag}."
        for i in range(paragraphs)
    )


def test_normalize_joins_wrapped_lines_into_paragraphs():
    text = "Chapter 1\n\n\nIt is a truth\nuniversally acknowledged.\r\n\r\nNext  one.\n"
    assert normalize(text) == "Chapter 1\nIt is a truth universally acknowledged.\nNext  one.\n"


def test_chunk_paragraphs_respects_word_budget_and_order():
    paragraphs = [" ".join(f"w{i}" for _ in range(n)) for i, n in enumerate([3, 4, 5, 9, 1])]
    docs = chunk_paragraphs("\n".join(paragraphs), max_words=8)
    assert (
        [d.split("\n") for d in docs]
        == [
            paragraphs[0:2],
            paragraphs[2:3],
            paragraphs[3:4],  # longer than the budget: a document of its own
            paragraphs[4:5],
        ]
    )
    assert "\n".join(docs) == "\n".join(paragraphs)


def test_directory_holds_out_the_named_file(tmp_path: Path):
    for tag in ("alpha", "beta", "gamma"):
        (tmp_path / f"{tag}.txt").write_text(_book(tag))
    text = load_demo_text(tmp_path, holdout="beta")
    assert text.heldout_name == "beta"
    assert set(text.train) == {"alpha", "gamma"}
    assert "beta" in text.heldout and not any("beta" in t for t in text.train.values())
    default = load_demo_text(tmp_path)
    assert default.heldout_name == "gamma"  # the last file in sorted order


def test_single_file_holds_out_its_last_tenth(tmp_path: Path):
    path = tmp_path / "book.txt"
    path.write_text(_book("x", paragraphs=50))
    text = load_demo_text(path)
    (train,) = text.train.values()
    train_pars, held_pars = train.splitlines(), text.heldout.splitlines()
    assert train_pars + held_pars == normalize(path.read_text()).splitlines()
    assert 4 <= len(held_pars) <= 6  # ~10% of 50 equal paragraphs
    assert not set(train_pars) & set(held_pars)


@pytest.mark.parametrize(
    ("make", "holdout", "fragment"),
    [
        (lambda d: d / "missing.txt", None, "no such file or directory"),
        (lambda d: (d / "one.txt").write_text(_book("a")) and d, None, "at least 2 .txt files"),
        (lambda d: d, "nope", "found 0"),
        (lambda d: (d / "b.txt").write_text("one paragraph") and d / "b.txt", None, "paragraphs"),
    ],
)
def test_bad_text_sources_say_what_is_wrong(tmp_path: Path, make, holdout, fragment):
    with pytest.raises(DemoTextError, match=fragment):
        load_demo_text(make(tmp_path), holdout)


def test_unknown_holdout_names_the_choices(tmp_path: Path):
    for tag in ("alpha", "beta"):
        (tmp_path / f"{tag}.txt").write_text(_book(tag))
    with pytest.raises(DemoTextError, match=r"--holdout 'delta'.*alpha"):
        load_demo_text(tmp_path, holdout="delta")


def test_write_training_jsonl(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    n = write_training_jsonl([_book("a", 10), _book("b", 10)], path, max_words=40)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == n > 2
    assert all(len(r["text"].split()) <= 40 for r in rows)
