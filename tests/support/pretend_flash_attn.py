"""Make transformers' real ``flash_attention_2`` dispatch run on a CPU machine.

The stand-in package ``tests/support/flash_attn_standin/flash_attn`` (flash-attn's
documented API in plain torch) must be on ``sys.path`` *before* transformers is imported:
transformers snapshots installed distributions at import (``PACKAGE_DISTRIBUTION_MAPPING``).
:func:`activate` then answers transformers' availability checks, which also require CUDA
(``modeling_flash_attention_utils``: ``is_flash_attn_2_available`` and the
compatibility matrix's general and device checks; the same names in 5.16 and 5.20).
"""

from __future__ import annotations

from pathlib import Path

STANDIN_DIR = Path(__file__).parent / "flash_attn_standin"


def activate() -> None:
    """Let transformers load the stand-in as flash-attn 2 on the CPU."""
    import flash_attn
    from transformers import modeling_flash_attention_utils as mfau

    assert Path(flash_attn.__file__).is_relative_to(STANDIN_DIR), flash_attn.__file__
    mfau.is_flash_attn_2_available = lambda *args, **kwargs: True
    entry = mfau.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
    entry["general_availability_check"] = lambda *args, **kwargs: True
    entry["supported_devices"] = ((lambda: True, "cpu"),)
