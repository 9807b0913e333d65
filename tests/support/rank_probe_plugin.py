"""A real Axolotl plugin for the multi-process tests: every rank writes what its own model
and optimizer look like during training, so the tests can check each rank (the LongLoRA
plugin logs from rank 0 only).

Each rank writes ``<output_dir>/rank_probe/rank<N>.json``: at its first optimizer step the
S2-Attn state, the trainable embedding/norm copies, the distributed setup, the step it
started from (a resumed run starts past 0), the token count of each forward pass of that
step, the loss and MLP functions and 4-bit layers the model runs with, and the bytes this rank holds for parameters, gradients (at the optimizer step),
optimizer master copies and moments; at the end of training the digest of every trained
``modules_to_save`` tensor, gathered in full under ZeRO-3 (identical on every rank when
the ranks kept them in sync). Rank 0 also writes
those tensors to ``rank_probe/trained_modules_to_save.safetensors``.

With ``LONGLORA_PROBE_KILL_AFTER_SAVE=N`` every rank exits hard (``os._exit``) right after
the checkpoint of step N is written: a run killed mid-training, to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _initial_lr(optimizer: Any, named: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """The learning rates (before the schedule) the optimizer's groups give the trainable
    embedding copies, norm copies and LoRA factors: ``{"embed": [...], "norm": [...],
    "lora": [...]}``, each sorted and without repeats."""
    inner = _inner_optimizer(optimizer) if optimizer is not None else None
    if inner is None:
        return {}
    kinds = {
        "embed": "embed_tokens.modules_to_save",
        "norm": "norm.modules_to_save",
        "lora": "lora_",
    }
    found: dict[str, set[float]] = {kind: set() for kind in kinds}
    ids = {id(p): n for n, p in named.items()}
    for group in inner.param_groups:
        lr = float(group.get("initial_lr", group["lr"]))
        for param in group["params"]:
            name = ids.get(id(param), "")
            for kind, marker in kinds.items():
                if marker in name:
                    found[kind].add(lr)
    return {kind: sorted(lrs) for kind, lrs in found.items()}


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank stores (ZeRO-3 keeps a partition in ``ds_tensor``)."""
    return getattr(param, "ds_tensor", param)


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        optimizer = inner
    return None


class RankProbeCallback(TrainerCallback):
    """Writes one JSON file per rank."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {}
        self.memory: dict[str, int] = {}
        self.hooked = False

    def _path(self) -> Path:
        return self.out_dir / f"rank{self.record['rank']}.json"

    def _write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path().write_text(json.dumps({**self.record, "memory": self.memory}, indent=2))

    def _hook_optimizer(self, optimizer: Any, model: Any) -> None:
        inner = _inner_optimizer(optimizer)
        if inner is None or self.hooked:
            return
        self.hooked = True
        model_params = {id(p) for p in model.parameters()}

        def before_step(opt, *_):
            if "gradients" not in self.memory:
                params = [p for g in opt.param_groups for p in g["params"]]
                self.memory["gradients"] = _bytes(p.grad for p in params if p.grad is not None)
                masters = [p for p in params if id(p) not in model_params]
                self.memory["master_copies"] = _bytes(masters)

        def after_step(opt, *_):
            if "moments" not in self.memory:
                self.memory["moments"] = _bytes(
                    v
                    for s in opt.state.values()
                    for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0
                )

        inner.register_step_pre_hook(before_step)
        inner.register_step_post_hook(after_step)

    def _hook_inputs(self, model: Any) -> None:
        """Record the token count of every forward pass of the first step (a row split
        over ``P`` context-parallel ranks: ``P`` passes of ``L / P`` tokens)."""
        self.lengths: list[int] = []

        def seen(module, args):
            if not self.record:
                self.lengths.append(int(args[0].shape[-1]))

        model.get_input_embeddings().register_forward_pre_hook(seen)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        if model is not None and optimizer is not None:
            if not hasattr(self, "lengths"):
                self._hook_inputs(model)
            self._hook_optimizer(optimizer, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.record or model is None:
            return
        import torch.distributed as dist
        from accelerate.state import PartialState

        from longlora_plugin.s2 import s2_settings

        settings = s2_settings(model)
        named = dict(model.named_parameters())
        trainable = sorted(n for n, p in named.items() if p.requires_grad)
        self.memory["parameters"] = _bytes(_local(p) for p in named.values())
        self.record = {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "accelerate": str(PartialState().distributed_type),
            "args_world_size": args.world_size,
            "parallel_mode": str(args.parallel_mode),
            "first_step": state.global_step,
            "attn_implementation": model.config._attn_implementation,
            "rope_parameters": dict(model.config.rope_parameters or {}),
            "s2_group_size": getattr(settings, "group_size", None),
            "trainable_embed": [n for n in trainable if "embed_tokens.modules_to_save" in n],
            "trainable_norm": [n for n in trainable if "norm.modules_to_save" in n],
            "trainable_lora": len([n for n in trainable if "lora_" in n]),
            "forward_lengths": self.lengths,
            # what Axolotl's memory features swap in: the loss and MLP functions, 4-bit layers
            "loss_function": _qualified(getattr(model, "loss_function", None)),
            "mlp_forward": _qualified(_first_mlp(model).forward),
            "linear_4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
            "initial_lr": _initial_lr(getattr(self, "optimizer", None), named),
        }
        self._write()

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("LONGLORA_PROBE_KILL_AFTER_SAVE", "0") or 0):
            os._exit(17)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.record or model is None:
            return
        trained = {}
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                trained[name] = _gathered(param)
        self.record["trained_digests"] = {
            name: hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()
            for name, t in trained.items()
        }
        self.record["steps"] = state.global_step
        self._write()
        if self.record["rank"] == 0:
            from safetensors.torch import save_file

            save_file(trained, str(self.out_dir / "trained_modules_to_save.safetensors"))


def _qualified(function: Any) -> str | None:
    if function is None:
        return None
    return f"{function.__module__}.{getattr(function, '__qualname__', function)}"


def _first_mlp(model: Any) -> Any:
    return next(m for name, m in model.named_modules() if name.endswith(".mlp"))


def _gathered(param: torch.Tensor) -> torch.Tensor:
    """The full tensor, gathered from every rank under ZeRO-3 (a collective there)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone().cpu()
    return param.detach().clone().cpu()


class RankProbePlugin(BasePlugin):
    """Adds :class:`RankProbeCallback` to the trainer."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [RankProbeCallback(Path(cfg.output_dir) / "rank_probe")]
