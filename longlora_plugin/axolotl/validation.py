"""``longlora validate``'s core: a training config checked as ``axolotl train`` would,
before any GPU hour is spent on it.

Offline and without weights when ``--model-config`` names a directory holding the base
model's ``config.json`` (it becomes ``base_model_config``; ``base_model`` keeps its Hub id,
which Axolotl inspects for model-family heuristics). Steps:

1. Axolotl's own config loading, as ``axolotl train`` does it (the functions
   ``axolotl.cli.config.load_cfg`` calls): the plugins' ``register`` hooks (the LongLoRA
   plugin's checks and rewrites), schema validation against the *target* GPU's
   capabilities (``--gpu``, default the paper's A100 80GB), ``normalize_config`` (which
   loads the model config). A bad config fails here with the exception training would
   raise; its message is printed and the exit code is 1.
2. The resolved LongLoRA settings: S2-Attn group size and shift, RoPE type/factor and
   the ``rope_parameters`` the model will be loaded with, the modules trained in full.
3. Trainable parameters by kind, counted on the real PEFT model built on the ``meta``
   device from Axolotl's own LoRA config (no memory, no weights).
4. Tokens per optimizer step and a per-GPU memory and time estimate
   (:mod:`longlora_plugin.memory`) for the config's DeepSpeed/FSDP setup, with its
   assumptions.

Nothing is written: no ``output_dir``, no ``debug.log``, no prepared dataset; datasets are
validated as config entries only (they need not exist here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longlora_plugin.axolotl.validate_report import Report, build_report

FLASH_BACKENDS = ("flash_attention_2", "flash_attention_3")


# GPU name -> Axolotl GPU capabilities used for schema validation.
COMPUTE_CAPABILITY = {
    "a100-80gb": "sm_80",
    "a100-40gb": "sm_80",
    "h100-80gb": "sm_90",
    "h200-141gb": "sm_90",
    "l40s-48gb": "sm_89",
    "a10g-24gb": "sm_86",
    "rtx4090-24gb": "sm_89",
}


class ValidationFailed(Exception):
    """The config would fail in training; ``str()`` is the message to show."""


def validate(
    config_path: str | Path,
    *,
    model_config: str | Path | None = None,
    gpus_per_node: int = 8,
    nodes: int = 1,
    gpu: str = "a100-80gb",
    local: bool = False,
    context_parallel: int | None = None,
) -> Report:
    """Validate ``config_path`` as ``axolotl train`` would; raise :class:`ValidationFailed`.
    ``context_parallel``: GPUs that split each row in the memory estimate (a what-if;
    default: the config's ``longlora.context_parallel``)."""
    import yaml

    path = Path(config_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValidationFailed(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ValidationFailed(f"{path} is not a YAML mapping of Axolotl keys")
    notes: list[str] = []
    world = max(1, gpus_per_node) * max(1, nodes)
    if context_parallel is not None and (context_parallel < 1 or world % context_parallel):
        raise ValidationFailed(
            f"--context-parallel {context_parallel}: must be >= 1 and divide the "
            f"{world} GPUs (gpus per node x nodes)"
        )
    _check_outside_axolotl(raw, model_config, notes)
    if model_config:
        raw["base_model_config"] = str(Path(model_config))

    try:
        cfg = _axolotl_validate(raw, path, world=world, gpu=gpu, local=local, notes=notes)
    except ValidationFailed:
        raise
    except Exception as err:  # noqa: BLE001 - training would stop on any of them
        message = str(err) or type(err).__name__
        if not isinstance(err, ValueError):
            message = f"{type(err).__name__}: {message}"
        raise ValidationFailed(message) from err
    configured = int((cfg.get("longlora") or {}).get("context_parallel") or 1)
    if world % configured:
        raise ValidationFailed(
            f"longlora.context_parallel={configured} does not divide the {world} GPUs "
            "(gpus per node x nodes); allowed: a divisor of the process count, or 1"
        )
    if context_parallel is not None and context_parallel != configured:
        notes.append(
            f"--context-parallel {context_parallel}: a what-if estimate (the config has "
            f"longlora.context_parallel={configured}); set it in the config to train so"
        )
    else:
        context_parallel = configured
    if configured > 1:
        notes.append(
            f"longlora.context_parallel={configured}: each row split over {configured} GPUs "
            "(docs/s2-attn.md); run by `axolotl train` on CPU processes (gloo) with DDP and "
            "ZeRO-3 in the tests, not yet on GPUs (NCCL)"
        )
    return build_report(
        cfg, path, world=world, gpu=gpu, notes=notes, context_parallel=context_parallel
    )


def _check_outside_axolotl(raw: dict, model_config: Any, notes: list[str]) -> None:
    """Problems Axolotl would not report before training starts."""
    plugins = [str(p) for p in raw.get("plugins") or []]
    has_plugin = any(p.startswith("longlora_plugin") for p in plugins)
    if "longlora" in raw and not has_plugin:
        if not registered_by_entry_point():
            raise ValidationFailed(
                "longlora block present but plugins does not list "
                "longlora_plugin.LongLoRAPlugin: Axolotl would drop the block silently and "
                "train without LongLoRA; add `plugins: [longlora_plugin.LongLoRAPlugin]`"
            )
        notes.append(
            "plugins does not list longlora_plugin.LongLoRAPlugin: this Axolotl registers "
            "it through its installed entry point anyway; list it so that the config also "
            "works on Axolotl 0.19, which does not"
        )
    if model_config is not None:
        directory = Path(model_config)
        if not (directory / "config.json").is_file():
            raise ValidationFailed(f"--model-config {directory}: no config.json in that directory")
        if raw.get("base_model_config"):
            notes.append(
                f"base_model_config={raw['base_model_config']!r} replaced by --model-config "
                f"{directory}"
            )
    ds = raw.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        raise ValidationFailed(
            f"deepspeed={ds!r}: no such file; Axolotl resolves the path from the working "
            f"directory ({Path.cwd()}): run from the repository root or give an absolute path"
        )


def registered_by_entry_point() -> bool:
    """True when the installed Axolotl registers this plugin without a ``plugins:`` entry
    (0.21+: every installed ``axolotl.plugins`` entry point; 0.19 has no such step)."""
    from axolotl.integrations import base

    builtin = getattr(base, "get_builtin_plugins", None)
    return builtin is not None and "longlora_plugin.LongLoRAPlugin" in builtin()


def _capabilities(gpu: str, world: int) -> tuple[dict, dict]:
    import torch

    cc = COMPUTE_CAPABILITY.get(gpu, "sm_80")
    capabilities = {
        "bf16": True,
        "fp8": cc >= "sm_89",
        "tf32": True,
        "n_gpu": world,
        "compute_capability": cc,
    }
    return capabilities, {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}


def _axolotl_validate(
    raw: dict, path: Path, *, world: int, gpu: str, local: bool, notes: list[str]
) -> Any:
    """What ``axolotl.cli.config.load_cfg`` does, minus telemetry, the temporary YAML copy
    and ``output_dir/debug.log``, with the target GPU's capabilities."""
    from axolotl.cli.config import plugin_set_cfg, prepare_plugins
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(raw)
    cfg.axolotl_config_path = str(path)
    _check_flash_attn(cfg, local, notes)
    prepare_plugins(cfg)
    capabilities, env_capabilities = _capabilities(gpu, world)
    try:
        cfg = validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    except Exception:
        if cfg.get("plugins"):
            from axolotl.integrations.base import PluginManager

            PluginManager.get_instance().on_config_validation_error(cfg)
        raise
    normalize_config(cfg)
    normalize_cfg_datasets(cfg)
    plugin_set_cfg(cfg)
    return cfg


def _check_flash_attn(cfg: Any, local: bool, notes: list[str]) -> None:
    """A missing flash-attn is an error with ``--local``, otherwise a note: validation
    usually runs away from the GPU machine, where flash-attn cannot be installed."""
    from importlib.util import find_spec

    from longlora_plugin.axolotl.cfg import attention_implementation

    impl, key = attention_implementation(cfg)
    if impl not in FLASH_BACKENDS or find_spec("flash_attn") is not None:
        return
    if local:
        raise ValidationFailed(
            f"{key}={cfg.get(key)!r} needs the flash-attn package, which is not installed "
            "here (pip install 'longlora-plugin[flash-attn]', CUDA only); or use "
            "attn_implementation: sdpa"
        )
    notes.append(
        "flash-attn is not installed on this machine: the training machine needs it "
        "(pip install 'longlora-plugin[flash-attn]'); --local makes this an error"
    )
