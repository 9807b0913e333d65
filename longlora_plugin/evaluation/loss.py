"""Per-token negative log-likelihood without full-vocabulary logits for a whole window.

:func:`token_nll` runs the decoder once, then applies the output head to the hidden
states of the *scored* positions only, ``chunk_tokens`` positions at a time, in float32.
Peak extra memory is ``chunk_tokens x vocab`` floats instead of ``batch x length x
vocab`` (at 32k tokens and a 32k vocabulary: 0.26 GB per 2,048-token chunk instead of
4 GB per sequence).

Supported: causal LMs whose logits are ``head(decoder(...).last_hidden_state)``, with
Gemma-style ``final_logit_softcapping`` and Cohere-style ``logit_scale`` applied as the
models do; PEFT-wrapped models (the LoRA layers live inside the decoder).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048


def decoder_and_head(model: Any) -> tuple[Any, Any, Any]:
    """``(decoder, head, config)`` of a causal LM (PEFT wrapper unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if decoder is base or head is None:
        raise TypeError(
            f"{type(base).__name__} does not expose a decoder and an output head; "
            "chunked evaluation needs a *ForCausalLM model"
        )
    return decoder, head, base.config


def _postprocess(logits: torch.Tensor, config: Any) -> torch.Tensor:
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def token_nll(
    model: Any,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Negative log-likelihood (nats, float32) of ``targets`` under ``model``.

    ``input_ids`` and ``targets`` are ``[batch, length]``; ``targets[b, t]`` is the token
    to predict *after* reading ``input_ids[b, : t + 1]`` (the caller shifts), or
    :data:`IGNORE_INDEX` for an unscored position. Returns ``[batch, length]`` with 0 at
    unscored positions. ``chunk_tokens=None`` computes all scored positions at once.
    """
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} != targets {tuple(targets.shape)}")
    decoder, head, config = decoder_and_head(model)
    device = next(head.parameters()).device
    input_ids = input_ids.to(device)
    targets = targets.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    scored = targets != IGNORE_INDEX
    states = hidden[scored]
    wanted = targets[scored]
    del hidden
    out = torch.zeros(targets.shape, dtype=torch.float32, device=device)
    step = chunk_tokens or max(1, states.shape[0])
    pieces = []
    for start in range(0, states.shape[0], step):
        logits = _postprocess(head(states[start : start + step]).float(), config)
        pieces.append(F.cross_entropy(logits, wanted[start : start + step], reduction="none"))
        del logits
    if pieces:
        out[scored] = torch.cat(pieces)
    return out
