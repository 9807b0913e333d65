"""One S2 attention call outside a model, on every training path: the padded CPU kernels
and the two varlen kernels (CUDA only) through their contract stand-ins."""

from __future__ import annotations

import contextlib
import sys
import types
from unittest import mock

import torch

from longlora_plugin.s2 import backend as backend_module
from longlora_plugin.s2.backend import DeferredMask, S2Settings, s2_attention_forward
from longlora_plugin.s2.kernels import TORCH_VARLEN
from s2_harness import varlen_contracts

# S2 paths under test: the padded CPU kernels, and the two varlen kernels (CUDA only)
# through the stand-ins of s2_harness/varlen_contracts.py.
BACKENDS = ["sdpa", "eager", "torch_varlen", "flash_attention_2"]


class Attn(torch.nn.Module):
    """Stands in for a model's attention module: ``training``, the GQA ratio, a config,
    and a float32 linear layer (what transformers' flash path reads for its target dtype)."""

    def __init__(self, num_key_value_groups: int = 1):
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.config = types.SimpleNamespace()
        self.o_proj = torch.nn.Linear(1, 1)


@contextlib.contextmanager
def kernels_for(backend: str):
    """Run ``backend``'s S2 path on CPU: the varlen ones with their contract stand-ins."""
    with contextlib.ExitStack() as stack:
        if backend == "torch_varlen":
            stack.enter_context(
                mock.patch.object(backend_module, "select_kernel", lambda *a: TORCH_VARLEN)
            )
            stack.enter_context(
                mock.patch("torch.nn.attention.varlen.varlen_attn", varlen_contracts.varlen_attn)
            )
        if backend == "flash_attention_2":
            module = types.SimpleNamespace(
                flash_attn_varlen_func=varlen_contracts.flash_attn_varlen_func
            )
            stack.enter_context(mock.patch.dict(sys.modules, {"flash_attn": module}))
        yield


def run_s2(backend, q, k, v, group, position_ids, valid, window=None, training=True, builder=None):
    module = Attn(q.shape[1] // k.shape[1]).train(training)
    mask = DeferredMask(builder or (lambda **kw: None), {"attention_mask": valid})
    settings = S2Settings("sdpa" if backend == "torch_varlen" else backend, group, 0.25)
    with kernels_for(backend):
        out, weights = s2_attention_forward(
            settings,
            module,
            q,
            k,
            v,
            mask,
            position_ids=position_ids,
            scaling=q.shape[-1] ** -0.5,
            sliding_window=window,
            dropout=0.0,
        )
    assert weights is None
    return out
