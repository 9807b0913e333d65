"""Read evaluation documents into a list of strings.

:func:`load_texts` accepts

* a ``.txt``/``.md`` file: one document;
* a directory of ``.txt``/``.md`` files (sorted by name, recursive): one document each;
  a directory written by ``datasets``' ``save_to_disk`` is read as a dataset instead;
* a ``.jsonl``/``.json`` file: one document per record, from ``text_field``;
* anything else: ``datasets.load_dataset(source)`` (offline: only what is in the local
  cache or on disk).

Empty documents are dropped; the order is kept, so ``max_docs`` takes the first ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md")
JSON_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
SPLIT_PREFERENCE: tuple[str, ...] = ("test", "validation", "train")


class TextSourceError(ValueError):
    """The evaluation data cannot be read or holds no usable text."""


def load_texts(
    source: str | Path,
    *,
    text_field: str = "text",
    split: str | None = None,
    max_docs: int | None = None,
) -> list[str]:
    """Documents from ``source`` (see the module docstring); raise :class:`TextSourceError`
    if it cannot be read or yields no non-empty document.

    ``split`` picks a split of a dataset with several (default: ``test``, then
    ``validation``, then ``train``, then the first).
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        docs = _read_json(path, text_field)
    elif path.is_file():
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    elif path.is_dir() and _is_saved_dataset(path):
        docs = _read_dataset(str(path), text_field, split, from_disk=True)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise TextSourceError(
                f"data={str(source)!r}: directory has no {'/'.join(TEXT_SUFFIXES)} files"
            )
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    else:
        docs = _read_dataset(str(source), text_field, split, from_disk=False)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise TextSourceError(f"data={str(source)!r} holds no non-empty document")
    return docs[:max_docs] if max_docs else docs


def _read_json(path: Path, field: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    docs: list[str] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or field not in record:
            raise TextSourceError(
                f"{path}: record {i} has no field {field!r} (set --text-field / "
                "longlora.eval.text_field)"
            )
        docs.append(str(record[field]))
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_dataset(source: str, field: str, split: str | None, *, from_disk: bool) -> list[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets ships with transformers' stack
        raise TextSourceError(f"data={source!r} needs the datasets package: {err}") from err
    try:
        loaded: Any = (
            datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source)
        )
    except Exception as err:  # noqa: BLE001 - report any loading failure the same way
        raise TextSourceError(
            f"data={source!r} is neither a readable file/directory nor a dataset available "
            f"locally: {type(err).__name__}: {err}"
        ) from err
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        names = list(loaded.keys())
        if split is not None:
            if split not in loaded:
                raise TextSourceError(f"data={source!r} has no split {split!r}; splits: {names}")
            name = split
        else:
            name = next((s for s in SPLIT_PREFERENCE if s in loaded), names[0])
        loaded = loaded[name]
    if field not in loaded.column_names:
        raise TextSourceError(
            f"data={source!r} has no column {field!r}; columns: {loaded.column_names}"
        )
    return [str(t) for t in loaded[field]]
