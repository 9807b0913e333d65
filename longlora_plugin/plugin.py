"""``LongLoRAPlugin``: LongLoRA in Axolotl from a ``longlora:`` YAML block.

Hook use (Axolotl 0.19; the same hooks exist in 0.21):

* ``register(cfg)`` - raw config, before validation and before any weights load. All
  checks happen here, so bad input fails early. It resolves RoPE and writes it into
  ``model_config`` (Axolotl fixes the model config in ``ModelLoader.__init__``, before
  ``pre_model_load``), adds the embedding/norm names to ``lora_modules_to_save``, and
  under ``axolotl merge-lora`` stages a base-model directory whose ``config.json``
  carries the RoPE (0.19's merge copies ``config.json`` from ``base_model``).
* ``post_model_build(cfg, model)`` - switches the plain HF model to S2-Attn and logs the
  two INFO lines ``longlora: S2-Attn on ...`` and ``longlora: RoPE ...``.
* ``post_model_load`` - dynamic NTK only: undoes Axolotl's raise of
  ``max_position_embeddings`` (dynamic NTK reads it as the pre-training length).
* ``post_train`` (called twice by Axolotl) - switches back to the wrapped attention
  backend; idempotent. With ``longlora.eval`` it evaluates the trained model once, at
  the second call (after the model is saved), into ``<output_dir>/longlora_eval/``.
* ``post_lora_merge`` (0.21+ only) - writes the RoPE into the merged ``config.json``.

Without a ``longlora:`` block every hook returns immediately and ``cfg`` is untouched.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin

from longlora_plugin.config import LongLoRAConfig, LongLoRAConfigError, parse_longlora
from longlora_plugin.rope import RopeResolution, load_base_config, resolve_rope
from longlora_plugin.s2 import SUPPORTED_BACKENDS

LOG = logging.getLogger("longlora_plugin")

INPUT_ARGS = "longlora_plugin.config.LongLoRAArgs"
LORA_ADAPTERS = ("lora", "qlora")
MERGE_BASE_DIR = ".longlora_merge_base"
EVAL_DIR = "longlora_eval"
# Axolotl's legacy boolean attention flags -> attn_implementation (utils/schemas/enums.py).
LEGACY_ATTN_FLAGS = {
    "xformers_attention": "xformers",
    "sage_attention": "sage",
    "flex_attention": "flex_attention",
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
}


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
        self._rope: RopeResolution | None = None
        self._s2_on: bool = False
        self._post_train_calls: int = 0
        self._attn_written: tuple[str | None, str, Any] | None = None

    def is_primary(self) -> bool:
        """False for a second instance of this plugin in Axolotl's plugin manager.

        Axolotl keys plugins by the name they are listed under, and 0.21 also registers
        every installed ``axolotl.plugins`` entry point (ours:
        ``longlora_plugin.LongLoRAPlugin``). A config listing
        ``longlora_plugin.plugin.LongLoRAPlugin``, or both spellings on any version, gets
        two instances: without this every hook and ``longlora.eval`` would run twice,
        and 0.21's schema merge would fail on the doubled arguments. The first instance
        registered acts; the others do nothing. An instance outside the manager acts.
        """
        from axolotl.integrations.base import PluginManager

        mine = [
            p
            for p in PluginManager.get_instance().plugins.values()
            if isinstance(p, LongLoRAPlugin)
        ]
        return self not in mine or mine[0] is self

    # ------------------------------------------------------------------ schema
    @_primary_only
    def get_input_args(self) -> str:
        """Dotted path of the pydantic model declaring the ``longlora`` key."""
        return INPUT_ARGS

    # ------------------------------------------------------------------ config
    @_primary_only
    def register(self, cfg: dict) -> None:
        """Validate the ``longlora`` block and rewrite ``cfg`` (raw dict) in place.

        Raises :class:`LongLoRAConfigError` (a ``ValueError``) naming the key, the
        value and what is allowed. No-op without a ``longlora`` key.
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
        settings = parse_longlora(cfg["longlora"])
        sequence_len = _sequence_len(cfg)
        check_combinations(cfg, settings, sequence_len)
        check_eval_data(settings)
        impl, key = attention_implementation(cfg)
        self._attn_written = (impl, key, cfg.get(key))  # validation drops legacy flags

        base_name = cfg.get("base_model_config") or cfg.get("base_model")
        if not base_name:
            raise LongLoRAConfigError("longlora needs base_model to be set")
        base_config = _load_config(cfg, base_name)

        self._rope = resolve_rope(
            base_config,
            rope_type=settings.rope.type,
            factor=settings.rope.factor,
            sequence_len=sequence_len,
            original_max_position_embeddings=settings.rope.original_max_position_embeddings,
        )
        if self._rope.scaled:
            apply_model_config_overrides(cfg, self._rope)
        add_trainable_modules(cfg, settings, base_config)
        if cfg.get("merge_lora") and self._rope.scaled and not _has_merge_hook():
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
        written = self._attn_written or (impl, key, cfg.get(key))
        require_flash_attn(*written)

    @_primary_only
    def post_model_build(self, cfg: Any, model: Any) -> None:
        """Switch the built model to S2-Attn (training runs) and log the two INFO lines."""
        if cfg.get("longlora") is None:
            return
        ensure_log_visible()
        settings = parse_longlora(cfg["longlora"])
        sequence_len = _sequence_len(cfg)
        if settings.s2_attn and not cfg.get("merge_lora"):
            from longlora_plugin.s2 import enable_s2_attn

            group = settings.group_size_for(sequence_len)
            enable_s2_attn(model, group_size=group)
            self._s2_on = True
            _info(
                "longlora: S2-Attn on %d attention layers, group size %d, shift %d",
                count_attention_layers(model),
                group,
                group // 2,
            )
        elif not settings.s2_attn:
            _info("longlora: S2-Attn off (longlora.s2_attn: false)")
        rope = self._rope or self._resolve_again(cfg, settings, sequence_len)
        _check_model_rope(model, rope)
        _info(rope.log_line())

    @_primary_only
    def post_model_load(self, cfg: Any, model: Any) -> None:
        """dynamic NTK: restore ``max_position_embeddings`` to the original context."""
        if cfg.get("longlora") is None or self._rope is None or self._rope.rope_type != "dynamic":
            return
        config = getattr(model, "config", None)
        if config is not None and config.max_position_embeddings != self._rope.original:
            _info(
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
            _info("longlora: training done, S2-Attn off (full attention from here on)")
            self._s2_on = False
        settings = parse_longlora(cfg["longlora"])
        if settings.eval is not None and self._post_train_calls == 2:
            self._run_eval(cfg, settings, model)

    def _run_eval(self, cfg: Any, settings: LongLoRAConfig, model: Any) -> None:
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

        spec = settings.eval
        output_dir = Path(cfg.get("output_dir") or "./model-out")
        out_dir = output_dir / EVAL_DIR
        rope = self._rope or self._resolve_again(cfg, settings, _sequence_len(cfg))
        _info("longlora: eval (full attention) into %s", out_dir)
        written = evaluate_trained(
            model,
            AutoTokenizer.from_pretrained(str(output_dir)),
            out_dir,
            name=output_dir.name,
            ppl_lengths=spec.ppl_lengths,
            data=spec.data,
            text_field=spec.text_field,
            split=spec.split,
            max_docs=spec.max_docs,
            conventions=spec.conventions,
            stride=spec.stride,
            max_windows=spec.max_windows,
            batch_size=spec.batch_size,
            passkey_lengths=spec.passkey_lengths,
            passkey_depths=spec.passkey_depths,
            passkey_trials=spec.passkey_trials,
            seed=spec.seed,
            original_length=rope.original or None,
            trained_length=_sequence_len(cfg),
            echo=lambda table: _info("longlora: eval results\n%s", table),
        )
        for kind, paths in written.items():
            _info("longlora: eval %s written: %s", kind, ", ".join(str(p) for p in paths.values()))

    @_primary_only
    def post_lora_merge(self, cfg: Any, adapter_path: str, output_path: str) -> None:
        """Axolotl >= 0.21: write the RoPE parameters into the merged ``config.json``."""
        if cfg.get("longlora") is None:
            return
        rope = self._rope or self._resolve_again(
            cfg, parse_longlora(cfg["longlora"]), _sequence_len(cfg)
        )
        if rope.scaled:
            patch_config_json(Path(output_path) / "config.json", rope)

    # ------------------------------------------------------------------ helpers
    def _resolve_again(
        self, cfg: Any, settings: LongLoRAConfig, sequence_len: int
    ) -> RopeResolution:
        base_name = cfg.get("base_model_config") or cfg.get("base_model")
        self._rope = resolve_rope(
            _load_config(cfg, base_name),
            rope_type=settings.rope.type,
            factor=settings.rope.factor,
            sequence_len=sequence_len,
            original_max_position_embeddings=settings.rope.original_max_position_embeddings,
        )
        return self._rope


# ---------------------------------------------------------------------- checks
def check_combinations(cfg: Any, settings: LongLoRAConfig, sequence_len: int) -> None:
    """Reject settings that conflict with the rest of the raw Axolotl config."""
    if cfg.get("s2_attention"):
        raise LongLoRAConfigError(
            f"s2_attention={cfg.get('s2_attention')!r} is Axolotl's removed S2-Attn; "
            "remove it: longlora.s2_attn provides S2-Attn"
        )
    explicit_group = settings.group_size is not None or settings.group_size_ratio is not None
    if settings.s2_attn or explicit_group:
        group = settings.group_size_for(sequence_len)
        if settings.group_size is not None:
            if group > sequence_len:
                raise LongLoRAConfigError(
                    f"longlora.group_size={group} is larger than sequence_len={sequence_len}; "
                    "allowed: 2 <= group_size <= sequence_len"
                )
        elif group < 2:
            ratio = settings.effective_group_size_ratio
            raise LongLoRAConfigError(
                f"longlora.group_size_ratio={ratio} gives group size int({ratio} * "
                f"{sequence_len}) = {group} with sequence_len={sequence_len}; the group size "
                "must be >= 2: raise the ratio or set longlora.group_size"
            )
    adapter = cfg.get("adapter")
    if adapter and cfg.get("unfrozen_parameters"):
        raise LongLoRAConfigError(
            f"unfrozen_parameters={list(cfg.get('unfrozen_parameters'))!r} cannot be combined "
            f"with adapter={adapter!r}: Axolotl applies it after wrapping and freezes the "
            "LoRA weights; remove it and list embed/norm/lm_head in "
            "longlora.trainable_params instead"
        )
    impl, key = attention_implementation(cfg)
    if settings.s2_attn and impl is not None:
        backends = SUPPORTED_BACKENDS
        if impl not in backends:
            raise LongLoRAConfigError(
                f"{key}={cfg.get(key)!r}: longlora.s2_attn wraps only {', '.join(backends)}; "
                "change attn_implementation or set longlora.s2_attn: false"
            )


def check_eval_data(settings: LongLoRAConfig) -> None:
    """Fail before training when ``longlora.eval.data`` is a local path that does not
    exist (a dataset name is only checked when the evaluation loads it)."""
    data = settings.eval.data if settings.eval is not None else None
    if not data:
        return
    path = Path(data)
    looks_local = path.suffix in (".txt", ".md", ".json", ".jsonl") or data.startswith(
        (".", "/", "~")
    )
    if looks_local and not path.expanduser().exists():
        raise LongLoRAConfigError(
            f"longlora.eval.data={data!r} does not exist; allowed: a .txt file, a directory "
            "of .txt files, a .jsonl file or a dataset available locally"
        )


def require_flash_attn(impl: str | None, key: str, value: Any) -> None:
    """Raise when the training backend is ``flash_attention_2`` and flash-attn is missing;
    ``key``/``value``: the config entry that asked for it, as the user wrote it."""
    if impl == "flash_attention_2" and find_spec("flash_attn") is None:
        raise LongLoRAConfigError(
            f"{key}={value!r} needs the flash-attn package, which is not installed; "
            "install it (pip install 'longlora-plugin[flash-attn]', CUDA only) or use "
            "attn_implementation: sdpa"
        )


def attention_implementation(cfg: Any) -> tuple[str | None, str]:
    """``(backend, config key the user wrote)`` from ``attn_implementation`` or a legacy
    boolean flag (Axolotl's validation maps the flag onto ``attn_implementation``);
    ``(None, "attn_implementation")`` when unset (transformers' default)."""
    impl = cfg.get("attn_implementation")
    for flag, backend in LEGACY_ATTN_FLAGS.items():
        if cfg.get(flag) and (not impl or impl == backend):  # Axolotl maps the flag
            return backend, flag
    if impl:
        return str(impl), "attn_implementation"
    return None, "attn_implementation"


# ---------------------------------------------------------------------- rope
def apply_model_config_overrides(cfg: Any, rope: RopeResolution) -> None:
    """Merge ``rope.config_overrides`` into ``model_config`` (alias
    ``overrides_of_model_config``), which Axolotl applies to the config it loads.

    A user-set ``rope_parameters`` that differs is an error; other user-set keys win.
    Calling twice with the same resolution is a no-op.
    """
    keys = [k for k in ("model_config", "overrides_of_model_config") if cfg.get(k) is not None]
    for key in keys or ["model_config"]:
        existing = dict(cfg.get(key) or {})
        for legacy in ("rope_parameters", "rope_scaling"):
            if legacy in existing and existing[legacy] != rope.rope_parameters:
                raise LongLoRAConfigError(
                    f"{key}.{legacy}={existing[legacy]!r} is set, and longlora.rope.type="
                    f"{rope.rope_type!r} would replace it with {rope.rope_parameters!r}; remove "
                    f"{key}.{legacy}, or set longlora.rope.type: none to keep yours"
                )
        merged = dict(existing)
        for name, value in rope.config_overrides.items():
            if name in existing and name != "rope_parameters" and existing[name] != value:
                LOG.warning(
                    "longlora: keeping %s.%s=%r (LongLoRA would set %r)",
                    key,
                    name,
                    existing[name],
                    value,
                )
                continue
            merged[name] = value
        cfg[key] = merged


def patch_config_json(path: Path, rope: RopeResolution) -> bool:
    """Merge ``rope.config_overrides`` into the ``config.json`` at ``path``; return
    whether the file changed. Idempotent."""
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    new = rope.apply_to_config_dict(data)
    if new == data:
        return False
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _info("longlora: wrote rope_parameters %s into %s", rope.rope_parameters, path)
    return True


def _has_merge_hook() -> bool:
    """True on Axolotl versions that call ``post_lora_merge`` after ``merge-lora``."""
    return hasattr(BasePlugin, "post_lora_merge")


def stage_merge_base(cfg: Any, rope: RopeResolution) -> Path:
    """Point ``cfg['base_model']`` at a directory that mirrors the base model (symlinks)
    but whose ``config.json`` carries the RoPE parameters.

    Why: Axolotl 0.19's memory-efficient ``merge-lora`` copies ``config.json`` from
    ``base_model`` into ``output_dir/merged`` and has no hook after the merge, so the
    merged model would silently lose the interpolation. The legacy merge path loads
    the same directory, so both paths produce a merged ``config.json`` with the RoPE.
    The directory is ``<output_dir>/.longlora_merge_base/<base model name>`` (the
    name is kept because Axolotl inspects it for model-family heuristics).
    """
    base = str(cfg.get("base_model"))
    source = _local_model_dir(cfg, base)
    output_dir = Path(cfg.get("output_dir") or "./model-out")
    staged = output_dir / MERGE_BASE_DIR / Path(base.rstrip("/")).name
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name == "config.json":
            continue
        _link_or_copy(entry.resolve(), staged / entry.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    (staged / "config.json").write_text(
        json.dumps(rope.apply_to_config_dict(config), indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    if not cfg.get("base_model_config"):
        cfg["base_model_config"] = str(staged)
    cfg["base_model"] = str(staged)
    _info(
        "longlora: merge-lora: using %s (mirror of %s with rope_parameters %s) as base_model "
        "so that the merged config.json keeps the RoPE interpolation",
        staged,
        source,
        rope.rope_parameters,
    )
    return staged


def _local_model_dir(cfg: Any, name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    revision = cfg.get("revision_of_model") or cfg.get("model_revision")
    return Path(snapshot_download(name, revision=revision))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _check_model_rope(model: Any, rope: RopeResolution) -> None:
    if not rope.scaled:
        return
    params = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    if params.get("rope_type") != rope.rope_type or params.get("factor") != rope.factor:
        LOG.warning(
            "longlora: the model was built with rope_parameters %s, expected %s "
            "(was model_config overridden after the plugin's register?)",
            params,
            rope.rope_parameters,
        )


# ---------------------------------------------------------------------- trainable
def add_trainable_modules(cfg: Any, settings: LongLoRAConfig, base_config: Any) -> None:
    """Add the architecture's embedding/norm/LM-head names to ``lora_modules_to_save``
    (LoRA/QLoRA only; full fine-tuning already trains everything)."""
    adapter = cfg.get("adapter")
    kinds = settings.trainable_params
    if not kinds:
        return
    if not adapter:
        _info(
            "longlora: full fine-tune: %s already train; trainable_params is a no-op",
            ", ".join(kinds),
        )
        return
    if adapter not in LORA_ADAPTERS:
        LOG.warning(
            "longlora: trainable_params (%s) use PEFT modules_to_save, which adapter=%r "
            "does not take; ignored",
            ", ".join(kinds),
            adapter,
        )
        return
    from longlora_plugin.trainable import find_trainable_modules

    found = find_trainable_modules(
        base_config, kinds, trust_remote_code=cfg.get("trust_remote_code") is True
    )
    existing = list(cfg.get("lora_modules_to_save") or [])
    cfg["lora_modules_to_save"] = existing + [n for n in found.names if n not in existing]
    for note in found.notes:
        _info("longlora: %s", note)
    if found.ensure_weight_tying:
        if cfg.get("peft_ensure_weight_tying") is None:
            cfg["peft_ensure_weight_tying"] = True
        elif cfg.get("peft_ensure_weight_tying") is False:
            LOG.warning(
                "longlora: the model ties its input and output embeddings but "
                "peft_ensure_weight_tying=false: the trained copies will drift apart"
            )
    _info(
        "longlora: training %s in full: lora_modules_to_save=%s",
        ", ".join(kinds),
        cfg["lora_modules_to_save"],
    )


# ---------------------------------------------------------------------- misc
def count_attention_layers(model: Any) -> int:
    """Number of attention modules (classes named ``*Attention``) in ``model``."""
    return sum(1 for module in model.modules() if type(module).__name__.endswith("Attention"))


def _sequence_len(cfg: Any) -> int:
    value = cfg.get("sequence_len")
    return int(value) if value else 512  # Axolotl's default


def _load_config(cfg: Any, name: str) -> Any:
    try:
        return load_base_config(
            str(name),
            trust_remote_code=cfg.get("trust_remote_code") is True,
            revision=cfg.get("revision_of_model") or cfg.get("model_revision"),
        )
    except (OSError, ValueError) as err:
        raise LongLoRAConfigError(
            f"longlora: cannot read the config of base_model={name!r} (needed for RoPE and "
            f"module names): {err}"
        ) from err


def _is_main_process() -> bool:
    """True unless a distributed launcher says this is not rank 0."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value and value.strip().isdigit() and int(value) != 0:
            return False
    return True


def _info(msg: str, *args: Any) -> None:
    """INFO on the ``longlora_plugin`` logger, from the main process only."""
    if _is_main_process():
        LOG.info(msg, *args, stacklevel=2)


_HANDLER_MARK = "_longlora_console"


def ensure_log_visible() -> None:
    """Make INFO records of the ``longlora_plugin`` logger show in Axolotl's console.

    Axolotl's console handlers drop INFO records of non-``axolotl`` loggers (and its
    logger class adds the same filter to loggers created later). This adds one handler
    (Axolotl's console stream and format, INFO only: WARNING and above still reach the
    root handlers) and sets the logger to INFO. Records keep propagating, so Axolotl's
    ``debug.log`` and pytest's ``caplog`` see them too. Idempotent.
    """
    logger = logging.getLogger("longlora_plugin")
    logger.filters = [f for f in logger.filters if type(f).__name__ != "AxolotlOrWarnErrorFilter"]
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    axolotl_logger = logging.getLogger("axolotl")
    if not axolotl_logger.handlers:  # Axolotl's logging not configured: leave it to the app
        return
    if any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        return
    console = next(
        (
            h
            for h in axolotl_logger.handlers
            if isinstance(h, logging.StreamHandler) and h.name in ("color_console", "console")
        ),
        None,
    )
    handler = logging.StreamHandler(console.stream if console else sys.stdout)
    handler.setFormatter(
        console.formatter
        if console and console.formatter
        else logging.Formatter("[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    )
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: record.levelno < logging.WARNING)
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
