"""Where the tools keep what they download or convert (one place for all of them)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LONGLORA_CACHE`` or ``$XDG_CACHE_HOME/longlora_plugin`` (``~/.cache/longlora_plugin``)."""
    if os.environ.get("LONGLORA_CACHE"):
        return Path(os.environ["LONGLORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longlora_plugin"
