"""A real Axolotl plugin used by ``test_multiprocess.py``: every rank writes what its own
model looks like during training, so the test can check each rank (the LongLoRA plugin
logs from rank 0 only). It also loads each rank's model onto the CPU when there is no
accelerator (see :meth:`RankProbePlugin.load_datasets`).

Listed after the LongLoRA plugin in ``plugins:``, so its hooks run after LongLoRA's. Each
rank writes ``<output_dir>/rank_probe/rank<N>.json`` at the first optimizer step
(S2-Attn state, trainable embedding/norm copies, distributed setup) and updates it at the
end of training with a digest of its trained embedding copy (identical on every rank if
DDP synchronised the ``modules_to_save`` gradients).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class RankProbeCallback(TrainerCallback):
    """Writes one JSON file per rank."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.record: dict[str, Any] = {}

    def _path(self) -> Path:
        return self.out_dir / f"rank{self.record['rank']}.json"

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != 1 or model is None:
            return
        import torch.distributed as dist
        from accelerate.state import PartialState

        from longlora_plugin.s2 import s2_settings

        settings = s2_settings(model)
        named = dict(model.named_parameters())
        trainable = sorted(n for n, p in named.items() if p.requires_grad)
        self.record = {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "accelerate": str(PartialState().distributed_type),
            "args_world_size": args.world_size,
            "parallel_mode": str(args.parallel_mode),
            "attn_implementation": model.config._attn_implementation,
            "s2_group_size": getattr(settings, "group_size", None),
            "trainable_embed": [n for n in trainable if "embed_tokens.modules_to_save" in n],
            "trainable_norm": [n for n in trainable if "norm.modules_to_save" in n],
            "trainable_lora": len([n for n in trainable if "lora_" in n]),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path().write_text(json.dumps(self.record, indent=2))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.record or model is None:
            return
        for name, param in model.named_parameters():
            if "embed_tokens.modules_to_save" in name:
                data = param.detach().float().cpu().contiguous().numpy().tobytes()
                self.record["embed_digest"] = hashlib.sha256(data).hexdigest()
        self.record["steps"] = state.global_step
        self._path().write_text(json.dumps(self.record, indent=2))


class RankProbePlugin(BasePlugin):
    """Adds :class:`RankProbeCallback` to the trainer; makes multi-process CPU runs work."""

    def register(self, cfg):
        """Axolotl 0.21's ``prepare_optim_env`` (after ``register``, in ``load_cfg``) asks
        ``torch.cuda.can_device_access_peer`` whether two ranks' GPUs can talk when
        ``WORLD_SIZE > 1``; with a CUDA build of torch on a machine without a GPU that
        raises instead of answering. There are no GPUs to connect here: answer yes."""
        import torch
        from axolotl.utils import trainer

        if not torch.cuda.is_available() and hasattr(trainer, "check_cuda_p2p_ib_support"):
            trainer.check_cuda_p2p_ib_support = lambda: True

    def load_datasets(self, cfg, preprocess: bool = False):
        """Runs after ``normalize_config`` and before the model loader reads
        ``cfg.device_map``. Axolotl 0.19 sets ``device_map = {"": LOCAL_RANK}`` whenever
        ``WORLD_SIZE > 1``, i.e. one accelerator per rank, and transformers then fails on a
        CPU-only machine ("Cannot access accelerator device when none is available"); on
        CPU every rank loads onto the CPU instead. Returns None: Axolotl loads the datasets.
        """
        import torch

        if cfg.world_size and cfg.world_size > 1 and not torch.cuda.is_available():
            cfg.device_map = "cpu"
        return None

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [RankProbeCallback(Path(cfg.output_dir) / "rank_probe")]
