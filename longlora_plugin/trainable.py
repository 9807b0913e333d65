"""Module names that LongLoRA trains in full next to LoRA (PEFT ``modules_to_save``).

No Axolotl import. Names are derived from the actual architecture: the model is built
on the ``meta`` device from its config (no weights, no memory), the embeddings come
from ``get_input_embeddings()``/``get_output_embeddings()`` and norms are found by
class. Packages can supply names for an architecture through the pluggy hook
``longlora_trainable_module_names`` (see :mod:`longlora_plugin.hookspecs`), which is
consulted first.

PEFT matches ``modules_to_save`` entries as *suffixes* of module names
(``key.endswith(name)``), so a leaf name such as ``norm`` also matches
``input_layernorm``. :func:`find_trainable_modules` therefore checks that every name
it returns matches only modules of the requested kind, and otherwise falls back to
full dotted names.

Tied input/output embeddings (``tie_word_embeddings``) are one tensor: training the
input embedding trains the LM head too. ``lm_head`` is then not listed separately and
``ensure_weight_tying`` is reported, so PEFT keeps the two trainable copies tied
(otherwise PEFT warns and the copies drift apart, see huggingface/peft#2777).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

LOG = logging.getLogger("longlora_plugin")

TrainableKind = Literal["embed", "norm", "lm_head"]
KINDS: tuple[str, ...] = get_args(TrainableKind)
NORM_CLASS_SUFFIXES: tuple[str, ...] = ("Norm", "RMSNorm", "LayerNorm")


@dataclass(frozen=True)
class TrainableModules:
    """Result of :func:`find_trainable_modules`.

    ``names``: distinct entries for PEFT ``modules_to_save`` (order: embed, norm,
    lm_head). ``by_kind``: the names per requested kind. ``tied``: the model ties its
    input and output embeddings. ``ensure_weight_tying``: PEFT's option of that name
    should be on. ``notes``: human-readable remarks worth logging.
    """

    names: list[str]
    by_kind: dict[str, list[str]]
    tied: bool = False
    ensure_weight_tying: bool = False
    notes: list[str] = field(default_factory=list)


def build_meta_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """Instantiate ``AutoModelForCausalLM`` for ``config`` on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def is_norm_module(module: nn.Module) -> bool:
    """True for ``nn.LayerNorm``/``nn.RMSNorm`` and any class named ``*Norm``."""
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    return type(module).__name__.endswith(NORM_CLASS_SUFFIXES)


def embeddings_tied(model: nn.Module, config: Any) -> bool:
    """True when the input and output embeddings share one weight."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return False
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    return inp is not None and out is not None


def find_trainable_modules(
    config: Any,
    kinds: Iterable[str],
    *,
    model: nn.Module | None = None,
    trust_remote_code: bool = False,
) -> TrainableModules:
    """Derive ``modules_to_save`` names for ``kinds`` (subset of embed, norm, lm_head).

    ``model`` may be passed (any device); otherwise one is built on the meta device
    from ``config``. Raises ``ValueError`` when a requested kind matches no module.
    """
    requested = set(kinds)
    unknown = requested - set(KINDS)
    kinds = [k for k in KINDS if k in requested]
    if unknown:
        raise ValueError(f"unknown trainable kinds {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    if model is None:
        model = build_meta_model(config, trust_remote_code=trust_remote_code)
    named = dict(model.named_modules())
    tied = embeddings_tied(model, config)
    notes: list[str] = []
    by_kind: dict[str, list[str]] = {}

    from longlora_plugin.hookspecs import names_from_hooks

    for kind in kinds:
        hooked = names_from_hooks(config, kind)
        if hooked is not None:
            by_kind[kind] = list(dict.fromkeys(hooked))
            notes.append(f"{kind}: names from a longlora_trainable_module_names hook: {hooked}")
            continue
        paths = _paths_of_kind(model, named, kind)
        if kind == "lm_head" and tied and paths:
            embed_paths = _paths_of_kind(model, named, "embed")
            notes.append(
                "lm_head is tied to the input embedding (tie_word_embeddings): it is trained "
                f"through {', '.join(_leaf(p) for p in embed_paths)} with PEFT "
                "ensure_weight_tying; not saved twice"
            )
            paths = embed_paths
        if not paths:
            raise ValueError(
                f"longlora.trainable_params: found no {kind!r} module in "
                f"{type(model).__name__}; provide names through the "
                "longlora_trainable_module_names hook or remove it"
            )
        by_kind[kind] = _unambiguous_names(paths, named, kind, model)

    names = list(dict.fromkeys(n for kind in kinds for n in by_kind.get(kind, [])))
    wants_embedding = any(k in by_kind for k in ("embed", "lm_head"))
    return TrainableModules(
        names=names,
        by_kind=by_kind,
        tied=tied,
        ensure_weight_tying=tied and wants_embedding,
        notes=notes,
    )


def _paths_of_kind(model: nn.Module, named: dict[str, nn.Module], kind: str) -> list[str]:
    """Full dotted names of the modules of ``kind`` in ``model``."""
    if kind == "norm":
        return [name for name, mod in named.items() if name and is_norm_module(mod)]
    getter = model.get_input_embeddings if kind == "embed" else model.get_output_embeddings
    target = getter()
    if target is None:
        return []
    return [name for name, mod in named.items() if mod is target and name]


def _matches_kind(model: nn.Module, named: dict[str, nn.Module], kind: str) -> set[str]:
    paths = set(_paths_of_kind(model, named, kind))
    if kind in ("embed", "lm_head"):
        # Tied heads may be matched together with the embedding; both are embeddings.
        paths |= set(_paths_of_kind(model, named, "embed" if kind == "lm_head" else "lm_head"))
    return paths


def _unambiguous_names(
    paths: Sequence[str], named: dict[str, nn.Module], kind: str, model: nn.Module
) -> list[str]:
    """Leaf names for ``paths`` if each suffix-matches only modules of ``kind``;
    otherwise the full dotted path for the offending entries."""
    allowed = _matches_kind(model, named, kind)
    out: list[str] = []
    for path in paths:
        leaf = _leaf(path)
        hits = {name for name in named if name and name.endswith(leaf)}
        out.append(leaf if hits <= allowed else path)
    return list(dict.fromkeys(out))


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]
