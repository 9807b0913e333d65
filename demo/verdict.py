"""The demo's verdict: did the extension give a model that *uses* the longer context?

The criteria are fixed here, before the runs (issue 24), and never tuned to pass: when one
fails, the demo says FAILED and docs/demo.md says why. C0 is the base model's context (its
pre-training ``sequence_len``), L the trained length (LongLoRA's ``sequence_len``).

1. **The base model can retrieve, and only inside its context**: passkey accuracy (mean
   over depths) >= :data:`BASE_MIN_ACCURACY` at C0 and <= :data:`BASE_MAX_ACCURACY_AT_L`
   at L (without interpolation).
2. **LongLoRA retrieves everywhere up to L**: accuracy >= :data:`LONGLORA_MIN_ACCURACY` in
   every (length, depth) cell of the passkey grid.
3. **Training matters**: interpolation without training is clearly below LongLoRA: its
   mean accuracy over the lengths above C0 is at least :data:`INTERPOLATION_GAP` below
   LongLoRA's.
4. **Language modelling holds**: LongLoRA's perplexity at L is at most
   :data:`LONGLORA_MAX_PPL_RATIO` x the base model's at C0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASE_MIN_ACCURACY = 0.9
BASE_MAX_ACCURACY_AT_L = 0.2
LONGLORA_MIN_ACCURACY = 0.9
INTERPOLATION_GAP = 0.3
LONGLORA_MAX_PPL_RATIO = 1.05

# accuracy[model][length][depth] in [0, 1]; ppl[model][length]; models: base /
# interpolation / longlora
Accuracy = Mapping[str, Mapping[int, Mapping[float, float]]]
Perplexity = Mapping[str, Mapping[int, float]]


def _mean(values: Any) -> float:
    """The mean, rounded to 9 digits: accuracies are fractions of trials, and a mean of
    three 0.2s must compare equal to the 0.2 limit."""
    values = list(values)
    if not values:
        raise ValueError("no passkey cells to average")
    return round(sum(values) / len(values), 9)


def verdict(accuracy: Accuracy, ppl: Perplexity, base: int, target: int) -> dict[str, Any]:
    """Apply the four criteria; returns ``{"worked": bool, "checks": [...]}``, each check
    ``{"criterion", "value", "limit", "passed"}``."""
    base_own = _mean(accuracy["base"][base].values())
    base_far = _mean(accuracy["base"][target].values())
    longlora_cells = [
        acc
        for length, row in accuracy["longlora"].items()
        if length <= target
        for acc in row.values()
    ]
    longer = [n for n in accuracy["longlora"] if base < n <= target]
    gap = round(
        _mean(_mean(accuracy["longlora"][n].values()) for n in longer)
        - _mean(_mean(accuracy["interpolation"][n].values()) for n in longer),
        9,
    )
    ratio = round(ppl["longlora"][target] / ppl["base"][base], 9)
    checks = [
        (
            f"base model passkey accuracy at its own {base} tokens >= {BASE_MIN_ACCURACY:.0%}",
            base_own,
            BASE_MIN_ACCURACY,
            base_own >= BASE_MIN_ACCURACY,
        ),
        (
            f"base model passkey accuracy at {target} tokens <= {BASE_MAX_ACCURACY_AT_L:.0%}",
            base_far,
            BASE_MAX_ACCURACY_AT_L,
            base_far <= BASE_MAX_ACCURACY_AT_L,
        ),
        (
            f"LongLoRA passkey accuracy >= {LONGLORA_MIN_ACCURACY:.0%} in every length x depth "
            f"cell up to {target} tokens (value: the worst cell)",
            min(longlora_cells),
            LONGLORA_MIN_ACCURACY,
            min(longlora_cells) >= LONGLORA_MIN_ACCURACY,
        ),
        (
            f"interpolation without training is at least {INTERPOLATION_GAP:.0%} below LongLoRA "
            f"(mean passkey accuracy over {', '.join(map(str, sorted(longer)))} tokens; value: "
            "LongLoRA minus interpolation)",
            gap,
            INTERPOLATION_GAP,
            gap >= INTERPOLATION_GAP,
        ),
        (
            f"LongLoRA perplexity at {target} tokens <= {LONGLORA_MAX_PPL_RATIO}x the base "
            f"model's at {base} (value: the ratio)",
            ratio,
            LONGLORA_MAX_PPL_RATIO,
            ratio <= LONGLORA_MAX_PPL_RATIO,
        ),
    ]
    rows = [
        {"criterion": c, "value": v, "limit": lim, "passed": bool(ok)} for c, v, lim, ok in checks
    ]
    return {"worked": all(r["passed"] for r in rows), "checks": rows}


def verdict_text(outcome: Mapping[str, Any]) -> str:
    """The verdict as the report prints it."""
    lines = [
        "VERDICT: the context extension WORKED."
        if outcome["worked"]
        else "VERDICT: the context extension FAILED (see docs/demo.md for what is known)."
    ]
    for check in outcome["checks"]:
        mark = "pass" if check["passed"] else "FAIL"
        lines.append(f"  [{mark}] {check['criterion']}: measured {check['value']:.3f}")
    return "\n".join(lines)
