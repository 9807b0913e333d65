"""The plugin's INFO lines in Axolotl's console, from the main process only."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LOG = logging.getLogger("longlora_plugin")
_HANDLER_MARK = "_longlora_console"


def is_main_process() -> bool:
    """True unless a distributed launcher says this is not rank 0."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value and value.strip().isdigit() and int(value) != 0:
            return False
    return True


def info(msg: str, *args: Any) -> None:
    """INFO on the ``longlora_plugin`` logger, from the main process only."""
    if is_main_process():
        LOG.info(msg, *args, stacklevel=2)


def ensure_log_visible() -> None:
    """Make INFO records of the ``longlora_plugin`` logger show in Axolotl's console.

    Axolotl's console handlers drop INFO records of non-``axolotl`` loggers (and its
    logger class adds the same filter to loggers created later). This adds one handler
    (Axolotl's console stream and format, INFO only: WARNING and above still reach the
    root handlers) and sets the logger to INFO. Records keep propagating, so Axolotl's
    ``debug.log`` and pytest's ``caplog`` see them too. Idempotent.
    """
    logger = logging.getLogger("longlora_plugin")
    logger.filters = [f for f in logger.filters if type(f).__name__ != "AxolotlOrWarnErrorFilter"]
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    axolotl_logger = logging.getLogger("axolotl")
    if not axolotl_logger.handlers:  # Axolotl's logging not configured: leave it to the app
        return
    if any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        return
    console = next(
        (
            h
            for h in axolotl_logger.handlers
            if isinstance(h, logging.StreamHandler) and h.name in ("color_console", "console")
        ),
        None,
    )
    handler = logging.StreamHandler(console.stream if console else sys.stdout)
    handler.setFormatter(
        console.formatter
        if console and console.formatter
        else logging.Formatter("[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    )
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: record.levelno < logging.WARNING)
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
