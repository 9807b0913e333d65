"""Austen's novels from the Debian package, parsed without R."""

from __future__ import annotations

import shutil

import pytest

from demo.corpora import AUSTEN_NOVELS, austen_novels


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt-get")
def test_austen_novels_are_extracted_and_cached(tmp_path):
    paths = austen_novels(tmp_path)
    assert sorted(paths) == sorted(AUSTEN_NOVELS)
    emma = paths["emma"].read_text(encoding="utf-8")
    assert emma.startswith("EMMA\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in emma
    assert 150_000 < len(emma.split()) < 170_000  # ~160k words
    pride = paths["prideprejudice"].read_text(encoding="utf-8")
    assert "It is a truth universally acknowledged" in pride
    # second call: served from the cache, no download
    before = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert austen_novels(tmp_path) == paths
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == before
