"""``LongLoRAPlugin``: LongLoRA in Axolotl from a ``longlora:`` YAML block.

Hook use (the same hooks in Axolotl 0.19 and 0.21):

* ``register(cfg)`` - raw config, before validation and before any weights load. The
  block is parsed here, once, and kept; all config checks happen here, so bad input fails
  early. It resolves RoPE and writes it into ``model_config`` (Axolotl fixes the model
  config in ``ModelLoader.__init__``, before ``pre_model_load``), adds the embedding/norm
  names to ``lora_modules_to_save``, and under 0.19's ``axolotl merge-lora`` stages a
  base-model directory whose ``config.json`` carries the RoPE.
* ``pre_model_load(cfg)`` - refuses ``flash_attention_2`` training without flash-attn.
* ``post_model_build(cfg, model)`` - switches the plain HF model to S2-Attn (unless its
  rows are split over processes: see ``post_trainer_create``) and logs the two INFO lines
  ``longlora: S2-Attn on ...`` and ``longlora: RoPE ...``.
* ``pre_lora_load`` - seeds the LoRA initialisation with ``seed`` (0.19 does not).
* ``post_model_load`` - dynamic NTK only: undoes Axolotl's raise of
  ``max_position_embeddings`` (dynamic NTK reads it as the pre-training length).
* ``post_trainer_create`` - ``longlora.context_parallel > 1``: builds the context-parallel
  process groups (they need the Trainer's process group), switches the model to S2-Attn
  with them and splits each row's training step over them
  (:mod:`~longlora_plugin.axolotl.split_training_step`).
* ``post_train`` (called twice by Axolotl) - switches back to the wrapped attention
  backend; idempotent. With ``longlora.eval`` it evaluates the trained model once, at
  the second call (after the model is saved), into ``<output_dir>/longlora_eval/``.
* ``post_lora_merge`` (0.21+ only) - writes the RoPE into the merged ``config.json``.

Without a ``longlora:`` block every hook returns immediately and ``cfg`` is untouched.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin

from longlora_plugin.axolotl.cfg import (
    attention_implementation,
    base_model_config,
    run_rope,
    sequence_len,
)
from longlora_plugin.axolotl.checks import (
    check_combinations,
    check_context_parallel_world,
    check_eval_data,
    require_flash_attn,
)
from longlora_plugin.axolotl.logs import ensure_log_visible, info
from longlora_plugin.axolotl.merge import has_merge_hook, stage_merge_base
from longlora_plugin.axolotl.modules_to_save import add_trainable_modules
from longlora_plugin.axolotl.rope_config import (
    apply_model_config_overrides,
    check_model_rope,
    patch_config_json,
)
from longlora_plugin.config import LongLoRAConfig, parse_longlora
from longlora_plugin.rope import RopeResolution

LOG = logging.getLogger("longlora_plugin")
INPUT_ARGS = "longlora_plugin.config.LongLoRAArgs"
EVAL_DIR = "longlora_eval"


def _primary_only(hook):
    """Run ``hook`` only on the primary LongLoRA plugin (:meth:`LongLoRAPlugin.is_primary`)."""

    @functools.wraps(hook)
    def run(self: LongLoRAPlugin, *args: Any, **kwargs: Any) -> Any:
        return hook(self, *args, **kwargs) if self.is_primary() else None

    return run


class LongLoRAPlugin(BasePlugin):
    """Axolotl plugin applying LongLoRA: S2-Attn, trainable embeddings/norms, RoPE PI."""

    def __init__(self) -> None:
        super().__init__()
        self._settings: LongLoRAConfig | None = None
        self._rope: RopeResolution | None = None
        self._attn_written: tuple[str | None, str, Any] | None = None
        self._s2_on = False
        self._post_train_calls = 0

    def is_primary(self) -> bool:
        """False for a second instance of this plugin in Axolotl's plugin manager.

        Axolotl keys plugins by the name they are listed under, and 0.21 also registers
        every installed ``axolotl.plugins`` entry point (ours:
        ``longlora_plugin.LongLoRAPlugin``; ``longlora_plugin:LongLoRAPlugin`` is the same
        key). On 0.21 a config listing the class by its module,
        ``longlora_plugin.axolotl.plugin_hooks.LongLoRAPlugin``, or two spellings on any
        version, gets two instances: without this every hook and ``longlora.eval`` would
        run twice, and 0.21's schema merge would fail on the doubled arguments
        (``TypeError: duplicate base class LongLoRAArgs``). The first instance registered
        acts; the others do nothing. An instance outside the manager acts.
        """
        from axolotl.integrations.base import PluginManager

        plugins = PluginManager.get_instance().plugins.values()
        mine = [p for p in plugins if isinstance(p, LongLoRAPlugin)]
        return self not in mine or mine[0] is self

    def _prepared(self, cfg: Any) -> tuple[LongLoRAConfig, RopeResolution]:
        """The settings and RoPE ``register`` resolved (resolved here if it did not run)."""
        if self._settings is None:
            self._settings = parse_longlora(cfg["longlora"])
        if self._rope is None:
            self._rope = run_rope(cfg, self._settings)
        return self._settings, self._rope

    # ------------------------------------------------------------------ schema
    @_primary_only
    def get_input_args(self) -> str:
        """Dotted path of the pydantic model declaring the ``longlora`` key."""
        return INPUT_ARGS

    # ------------------------------------------------------------------ config
    @_primary_only
    def register(self, cfg: dict) -> None:
        """Validate the ``longlora`` block and rewrite ``cfg`` (raw dict) in place.

        Raises :class:`~longlora_plugin.config.LongLoRAConfigError` (a ``ValueError``)
        naming the key, the value and what is allowed. No-op without a ``longlora`` key.
        """
        if "longlora" not in cfg:
            return
        if cfg.get("longlora") is None:
            LOG.warning(
                "longlora: the block is empty (null), so the plugin does nothing; "
                "write `longlora: {}` for the defaults"
            )
            return
        ensure_log_visible()
        self._settings = settings = parse_longlora(cfg["longlora"])
        check_combinations(cfg, settings, sequence_len(cfg))
        check_eval_data(settings)
        impl, key = attention_implementation(cfg)
        self._attn_written = (impl, key, cfg.get(key))  # validation drops legacy flags
        base_config = base_model_config(cfg)
        self._rope = run_rope(cfg, settings, base_config)
        if self._rope.scaled:
            apply_model_config_overrides(cfg, self._rope)
        add_trainable_modules(cfg, settings, base_config)
        if cfg.get("merge_lora") and self._rope.scaled and not has_merge_hook():
            stage_merge_base(cfg, self._rope)

    # ------------------------------------------------------------------ model
    @_primary_only
    def pre_model_load(self, cfg: Any) -> None:
        """Fail before the model is built when its attention backend is not installed.

        Not at ``register``: ``axolotl merge-lora`` loads the same config (its first load
        without ``merge_lora`` set), runs no attention kernel and must work without
        flash-attn. On CUDA machines Axolotl's own validation rejects it earlier.
        """
        if cfg.get("longlora") is None or cfg.get("merge_lora"):
            return
        impl, key = attention_implementation(cfg)
        require_flash_attn(*(self._attn_written or (impl, key, cfg.get(key))))

    @_primary_only
    def post_model_build(self, cfg: Any, model: Any) -> None:
        """Switch the built model to S2-Attn (training runs) and log the two INFO lines."""
        if cfg.get("longlora") is None:
            return
        ensure_log_visible()
        settings, rope = self._prepared(cfg)
        if settings.s2_attn and not cfg.get("merge_lora") and settings.context_parallel == 1:
            self._switch_on_s2(cfg, model)
        elif not settings.s2_attn:
            info("longlora: S2-Attn off (longlora.s2_attn: false)")
        check_model_rope(model, rope)
        info(rope.log_line())

    def _switch_on_s2(self, cfg: Any, model: Any, context_parallel: Any = None) -> None:
        """Switch ``model`` to S2-Attn, once per run (``post_model_build``, or
        ``post_trainer_create`` with the context-parallel group), and log the INFO line."""
        from longlora_plugin.s2 import enable_s2_attn

        settings, _ = self._prepared(cfg)
        group = settings.group_size_for(sequence_len(cfg))
        enable_s2_attn(
            model, group_size=group, context_parallel=context_parallel, shift=settings.shift
        )
        self._s2_on = True
        layers = sum(1 for m in model.modules() if type(m).__name__.endswith("Attention"))
        info(
            "longlora: S2-Attn on %d attention layers, group size %d, shift %d%s",
            layers,
            group,
            group // 2 if settings.shift else 0,
            "" if settings.shift else " (longlora.shift: false, short attention: an ablation)",
        )

    @_primary_only
    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """Seed the LoRA initialisation with the config's ``seed``.

        Axolotl 0.19 seeds only when the Trainer is built, after the adapter exists, so
        ``lora_A`` came from an unseeded generator: runs were not reproducible, and a
        resumed run could not be compared with an uninterrupted one. (0.21 seeds here
        itself.) Without ``seed`` nothing is seeded.
        """
        if cfg.get("longlora") is None or cfg.get("seed") is None:
            return
        from transformers import set_seed

        set_seed(int(cfg.get("seed")))

    @_primary_only
    def post_model_load(self, cfg: Any, model: Any) -> None:
        """dynamic NTK: restore ``max_position_embeddings`` to the original context."""
        if cfg.get("longlora") is None or self._rope is None or self._rope.rope_type != "dynamic":
            return
        config = getattr(model, "config", None)
        if config is not None and config.max_position_embeddings != self._rope.original:
            info(
                "longlora: dynamic RoPE: max_position_embeddings %s -> %d (dynamic NTK "
                "scales beyond it)",
                config.max_position_embeddings,
                self._rope.original,
            )
            config.max_position_embeddings = self._rope.original

    @_primary_only
    def post_train(self, cfg: Any, model: Any) -> None:
        """Switch back to the wrapped (full) attention backend; safe to call repeatedly.

        With ``longlora.eval``: Axolotl calls this hook twice, right after training and
        again after saving the model; the evaluation runs once, at the second call.
        """
        if cfg.get("longlora") is None:
            return
        self._post_train_calls += 1
        if self._s2_on:
            from longlora_plugin.s2 import disable_s2_attn

            disable_s2_attn(model)
            info("longlora: training done, S2-Attn off (full attention from here on)")
            self._s2_on = False
        settings, _ = self._prepared(cfg)
        wanted = settings.eval is not None and (
            settings.eval.ppl_lengths or settings.eval.passkey_lengths
        )
        if wanted and self._post_train_calls == 2:
            self._run_eval(cfg, model)

    @_primary_only
    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """``longlora.context_parallel > 1``: split each row over that many processes
        (:mod:`~longlora_plugin.axolotl.split_training_step`)."""
        if cfg.get("longlora") is None or cfg.get("merge_lora"):
            return
        settings, _ = self._prepared(cfg)
        size = settings.context_parallel
        if not settings.s2_attn or size == 1:
            return
        import torch.distributed as dist

        from longlora_plugin.axolotl.split_training_step import split_rows
        from longlora_plugin.s2.context_parallel import context_parallel_groups

        world = dist.get_world_size() if dist.is_initialized() else 1
        check_context_parallel_world(size, world)
        cp, _ = context_parallel_groups(size)
        self._switch_on_s2(cfg, trainer.model, cp)
        split_rows(trainer, cp)
        info(
            "longlora: S2-Attn context parallelism: each row split over %d processes "
            "(%d data-parallel group%s)",
            size,
            world // size,
            "s" * (world // size > 1),
        )

    @_primary_only
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        """``longlora.eval.every_n_steps``: the evaluation during training
        (:class:`~longlora_plugin.evaluation.progress.ProgressEval`) at the original and
        the trained context, into ``<output_dir>/longlora_eval/``."""
        if cfg.get("longlora") is None:
            return []
        settings, rope = self._prepared(cfg)
        if settings.eval is None or not settings.eval.every_n_steps:
            return []
        from longlora_plugin.evaluation.progress import ProgressEval
        from longlora_plugin.evaluation.texts import load_texts

        spec = settings.eval
        docs = (
            load_texts(
                spec.data, text_field=spec.text_field, split=spec.split, max_docs=spec.max_docs
            )
            if spec.data
            else []
        )
        lengths = [n for n in (rope.original, sequence_len(cfg)) if n]
        out_dir = Path(cfg.get("output_dir") or "./model-out") / EVAL_DIR
        info(
            "longlora: evaluating every %d steps at %s tokens into %s",
            spec.every_n_steps,
            ", ".join(map(str, lengths)),
            out_dir,
        )
        return [
            ProgressEval(spec.every_n_steps, out_dir, lengths, docs, samples=spec.progress_samples)
        ]

    def _run_eval(self, cfg: Any, model: Any) -> None:
        """``longlora.eval`` on the trained in-memory model, into output_dir/longlora_eval."""
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            LOG.warning(
                "longlora: longlora.eval skipped in a multi-process run (the model may be "
                "sharded); run `longlora eval ppl|passkey` on %s instead",
                cfg.get("output_dir"),
            )
            return
        from transformers import AutoTokenizer

        from longlora_plugin.evaluation.runner import evaluate_trained

        settings, rope = self._prepared(cfg)
        output_dir = Path(cfg.get("output_dir") or "./model-out")
        out_dir = output_dir / EVAL_DIR
        info("longlora: eval (full attention) into %s", out_dir)
        written = evaluate_trained(
            model,
            AutoTokenizer.from_pretrained(str(output_dir)),
            out_dir,
            settings.eval,
            name=output_dir.name,
            original_length=rope.original or None,
            trained_length=sequence_len(cfg),
            echo=lambda table: info("longlora: eval results\n%s", table),
        )
        for kind, paths in written.items():
            info("longlora: eval %s written: %s", kind, ", ".join(str(p) for p in paths.values()))

    @_primary_only
    def post_lora_merge(self, cfg: Any, adapter_path: str, output_path: str) -> None:
        """Axolotl >= 0.21: write the RoPE parameters into the merged ``config.json``."""
        if cfg.get("longlora") is None:
            return
        _, rope = self._prepared(cfg)
        if rope.scaled:
            patch_config_json(Path(output_path) / "config.json", rope)
