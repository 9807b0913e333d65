"""S2-Attn's group size G: the one rule, defined here and imported by the backend (per
batch), the ``longlora:`` schema, the plugin's config checks and ``longlora validate``.

* G is ``group_size`` tokens when that is given, otherwise ``int(group_size_ratio * L)``
  for rows of ``L`` tokens (with context parallelism, the whole row's ``L``).
* The ratio defaults to :data:`DEFAULT_GROUP_SIZE_RATIO`, the paper's ``G = L / 4``,
  and lies in ``(0, 1]``.
* G is at least :data:`MIN_GROUP_SIZE`: half a group is the shift, and a group of one
  token would attend to itself only.

Where a bound is checked, and with which message, stays with the caller: the schema names
the YAML key, the plugin checks G against ``sequence_len`` before training, the backend
refuses a ratio that rounds below the minimum on the batch it is given.
"""

from __future__ import annotations

MIN_GROUP_SIZE = 2
DEFAULT_GROUP_SIZE_RATIO = 0.25  # the paper's G = L / 4


def group_size_for(length: int, group_size: int | None, group_size_ratio: float) -> int:
    """G for rows of ``length`` tokens: ``group_size`` when given, else
    ``int(group_size_ratio * length)``. Bounds are not checked here."""
    if group_size is not None:
        return group_size
    return int(group_size_ratio * length)


def validate_group(group_size: int | None, group_size_ratio: float | None) -> None:
    """Raise ``ValueError`` naming the argument unless ``group_size >= MIN_GROUP_SIZE``
    (when given) and ``0 < group_size_ratio <= 1``."""
    if group_size is not None and (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < MIN_GROUP_SIZE
    ):
        raise ValueError(
            f"group_size={group_size!r} is invalid: it must be an integer >= {MIN_GROUP_SIZE}"
        )
    if group_size is None and (
        group_size_ratio is None
        or not isinstance(group_size_ratio, (int, float))
        or not 0 < group_size_ratio <= 1
    ):
        raise ValueError(f"group_size_ratio={group_size_ratio!r} is outside (0, 1]")
