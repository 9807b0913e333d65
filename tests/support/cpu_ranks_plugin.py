"""A real Axolotl plugin that lets ``axolotl train`` run several ranks on CPU processes:
DDP, and DeepSpeed ZeRO-2/3 (gloo, DeepSpeed's CPU accelerator, ``DS_ACCELERATOR=cpu``).

On a GPU machine none of this is needed. On CPU processes these stand in the way, each
handled through an Axolotl or transformers extension point (plus one DeepSpeed-on-gloo
defect, below):

* Axolotl 0.21's ``prepare_optim_env`` (in ``load_cfg``, after ``register``) asks
  ``torch.cuda.can_device_access_peer`` whether two ranks' GPUs can talk; with a CUDA
  build of torch on a machine without a GPU that raises instead of answering.
  :meth:`register` answers: there are no GPUs to connect.
* Axolotl sets ``device_map = {"": LOCAL_RANK}`` (an accelerator index) when
  ``WORLD_SIZE > 1``; :meth:`load_datasets` (after ``normalize_config``, before the model
  loader reads it) puts every rank on the CPU. ZeRO-3 drops the device map itself.
* DeepSpeed: transformers' ``TrainingArguments`` sizes DeepSpeed's ``train_batch_size``
  from its own world size, which is 1 on a GPU-less machine unless ``use_cpu``
  (:meth:`get_training_args`); and the Trainer rebuilds accelerate's state, in which, with
  no accelerator device, accelerate finds no process-group backend and sees one process
  per rank (``ACCELERATE_USE_CPU`` instead makes it drop DeepSpeed): :class:`GlooTrainer`
  (:meth:`get_trainer_cls`) asks for gloo. DDP runs set ``ACCELERATE_USE_CPU=true``.
* One process with a DeepSpeed config (``axolotl merge-lora`` of a DeepSpeed run):
  Axolotl's ``setup_deepspeed_env`` (``utils/trainer.py``, from ``load_cfg``) starts
  DeepSpeed's process group for a single process with ``dist_backend="nccl"`` written in,
  which a CPU build cannot start; DeepSpeed keeps a process group that already exists, so
  :meth:`register` starts a one-process gloo group first.
* ZeRO-1/2 flatten the trainable parameters under grad mode, so the flat buffer requires
  grad, and gloo's ``all_gather_into_tensor`` (the optimizer step's parameter all-gather)
  refuses to write into views of it while grad mode is on ("Output 0 of Split is a view
  and is being modified inplace"); NCCL does not go through that path. :class:`GlooTrainer`
  runs DeepSpeed's optimizer step with grad mode off (a step records no graph anyway).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin


def _cpu_ranks(cfg: Any) -> bool:
    return bool(cfg.world_size and cfg.world_size > 1) and not torch.cuda.is_available()


def _deepspeed(cfg: Any) -> bool:
    return _cpu_ranks(cfg) and bool(cfg.deepspeed)


class GlooTrainer(AxolotlTrainer):
    """Axolotl's trainer with accelerate's process group on gloo (see the module)."""

    def training_step(self, *args, **kwargs):
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None and not getattr(wrapped.engine, "_step_without_grad_mode", False):
            wrapped.engine.step = torch.no_grad()(wrapped.engine.step)
            wrapped.engine._step_without_grad_mode = True
        return super().training_step(*args, **kwargs)

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        from accelerate.utils import InitProcessGroupKwargs

        args = super()._build_accelerator_args(**kwargs)
        handlers = [*args.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        args["kwargs_handlers"] = handlers
        return args


class CpuRanksPlugin(BasePlugin):
    """Makes multi-process runs of ``axolotl train`` work on CPU processes (see the module)."""

    def register(self, cfg):
        from axolotl.utils import trainer

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        p2p_check = hasattr(trainer, "check_cuda_p2p_ib_support")
        if world > 1 and not torch.cuda.is_available() and p2p_check:
            trainer.check_cuda_p2p_ib_support = lambda: True
        if world == 1 and cfg.get("deepspeed") and not torch.cuda.is_available():
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def load_datasets(self, cfg, preprocess: bool = False):
        if _cpu_ranks(cfg):
            cfg.device_map = "cpu"
        return None  # Axolotl loads the datasets

    def get_training_args(self, cfg):
        return {"use_cpu": True} if _deepspeed(cfg) else None

    def get_trainer_cls(self, cfg):
        return GlooTrainer if _deepspeed(cfg) else None
