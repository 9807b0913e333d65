"""Text for the CPU demo: training documents and one held-out document.

By default the text is Jane Austen's six novels (:func:`demo.corpora.austen_novels`)
with *Persuasion* held out. A user can pass their own text instead: a ``.txt`` file (its
last tenth is held out, cut at a paragraph break) or a directory of ``.txt`` files (one
file is held out, by default the last in sorted order). The held-out text is never part
of the training documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_HOLDOUT = "persuasion"
HOLDOUT_FRACTION = 0.1


class DemoTextError(ValueError):
    """The demo's text source is unusable; the message says what was given and why."""


@dataclass(frozen=True)
class DemoText:
    """Training texts (one string per source document) and the held-out document."""

    source: str
    train: dict[str, str]
    heldout_name: str
    heldout: str

    def describe(self) -> str:
        words = sum(len(t.split()) for t in self.train.values())
        return (
            f"{self.source}: training on {', '.join(self.train)} ({words:,} words); "
            f"held out: {self.heldout_name} ({len(self.heldout.split()):,} words)"
        )


def normalize(text: str) -> str:
    """Join hard-wrapped lines into paragraphs (one per line) and squeeze blank runs."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    joined = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)
    return "\n".join(p for p in joined if p) + "\n"


def load_demo_text(text: Path | None = None, holdout: str | None = None) -> DemoText:
    """Austen (``text=None``) or the user's ``.txt`` file / directory of ``.txt`` files,
    split into training documents and one held-out document (see the module docstring).
    ``holdout`` names the held-out novel or file stem."""
    if text is None:
        from demo.corpora import AUSTEN_NOVELS, austen_novels

        name = holdout or DEFAULT_HOLDOUT
        if name not in AUSTEN_NOVELS:
            raise DemoTextError(
                f"--holdout {name!r}: not an Austen novel; choose from {AUSTEN_NOVELS}"
            )
        paths = austen_novels()
        books = {k: normalize(p.read_text(encoding="utf-8")) for k, p in paths.items()}
        heldout = books.pop(name)
        return DemoText("Jane Austen's novels (Debian r-cran-janeaustenr)", books, name, heldout)
    if text.is_dir():
        files = sorted(text.glob("*.txt"))
        if len(files) < 2:
            raise DemoTextError(
                f"--text {text}: a directory needs at least 2 .txt files (found {len(files)}); "
                "pass a single .txt file to hold out its last tenth instead"
            )
        stems = [f.stem for f in files]
        name = holdout or stems[-1]
        if name not in stems:
            raise DemoTextError(f"--holdout {name!r}: no {name}.txt in {text}; files: {stems}")
        books = {f.stem: normalize(f.read_text(encoding="utf-8")) for f in files}
        heldout = books.pop(name)
        return DemoText(str(text), books, name, heldout)
    if text.is_file():
        if holdout is not None:
            raise DemoTextError("--holdout names a file of a --text directory; --text is a file")
        body = normalize(text.read_text(encoding="utf-8"))
        paragraphs = body.splitlines()
        cut = _cut_index(paragraphs, 1 - HOLDOUT_FRACTION)
        if cut == 0 or cut == len(paragraphs):
            raise DemoTextError(
                f"--text {text}: needs several paragraphs to hold out the last "
                f"{HOLDOUT_FRACTION:.0%} (found {len(paragraphs)})"
            )
        train = "\n".join(paragraphs[:cut]) + "\n"
        heldout = "\n".join(paragraphs[cut:]) + "\n"
        return DemoText(str(text), {text.stem: train}, f"{text.stem} (last tenth)", heldout)
    raise DemoTextError(f"--text {text}: no such file or directory")


def _cut_index(paragraphs: list[str], fraction: float) -> int:
    """Index of the first paragraph after ``fraction`` of the characters."""
    total = sum(len(p) for p in paragraphs)
    seen = 0
    for i, p in enumerate(paragraphs):
        if seen >= fraction * total:
            return i
        seen += len(p)
    return len(paragraphs)


def chunk_paragraphs(text: str, max_words: int) -> list[str]:
    """Consecutive paragraphs grouped into documents of at most ``max_words`` words
    (a longer paragraph is a document of its own)."""
    docs: list[str] = []
    current: list[str] = []
    words = 0
    for paragraph in text.splitlines():
        n = len(paragraph.split())
        if current and words + n > max_words:
            docs.append("\n".join(current))
            current, words = [], 0
        current.append(paragraph)
        words += n
    if current:
        docs.append("\n".join(current))
    return docs


def write_training_jsonl(texts: Iterable[str], path: Path, max_words: int) -> int:
    """Write ``{"text": ...}`` documents of at most ``max_words`` words; return how many.
    Axolotl's ``completion`` type cuts each into ``sequence_len`` token pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for text in tqdm(list(texts), desc="training documents", unit="text"):
            for doc in chunk_paragraphs(text, max_words):
                fh.write(json.dumps({"text": doc}) + "\n")
                count += 1
    return count
