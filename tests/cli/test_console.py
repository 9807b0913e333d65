"""The ``longlora`` console script's own output: ``--help`` of every command prints only
its usage (no library loads at parse time), and the entry point's filter drops exactly
the known import-time noise of torchao and torch, nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from longlora_plugin.cli import KNOWN_NOISE, quiet_known_noise
from longlora_plugin.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[2]
NOISE = ("Failed to load", "register_constant", "Warning")


@pytest.mark.parametrize("command", [[], ["eval", "ruler"]], ids=["longlora", "eval-ruler"])
def test_help_prints_only_the_usage(tmp_path, command):
    """``python -m longlora_plugin [eval ruler] --help`` in a fresh process: stdout and
    stderr together are the usage text, without torchao's or torch's log lines."""
    env = {**OFFLINE_ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "longlora_plugin", *command, "--help"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    prog = " ".join(["longlora", *command])
    assert proc.stdout.startswith(f"usage: {prog} [-h]"), proc.stdout[:2000]
    found = [word for word in NOISE if word in proc.stdout]
    assert not found, proc.stdout[:2000]


def test_parsers_load_no_heavy_library():
    """Building every command's parser imports neither transformers nor peft, torchao or
    Axolotl (a command imports them in ``run``): what keeps ``--help`` quiet and quick."""
    code = (
        "import sys\n"
        "from longlora_plugin.cli import build_parser\n"
        "build_parser()\n"
        "heavy = ('transformers', 'peft', 'torchao', 'bitsandbytes', 'axolotl')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy)[:5])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def _passes(logger: logging.Logger, message: str, *args: object) -> bool:
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, args, None)
    return bool(logger.filter(record))


def test_filter_drops_only_the_known_noise():
    """The torchao and torch records the libraries log at import are dropped; another
    torchao load failure and other torch warnings pass."""
    assert KNOWN_NOISE
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    torchao = logging.getLogger("torchao")
    pytree = logging.getLogger("torch.utils._pytree")
    for logger in (torchao, pytree):
        assert len(logger.filters) == len(set(map(type, logger.filters)))
    site = "/venv/lib/python3.11/site-packages/torchao"
    for name in ("_C_mxfp8.cpython-310-x86_64-linux-gnu.so", "_C_cutlass_90a.abi3.so"):
        path = f"{site}/{name}"
        assert not _passes(torchao, f"Failed to load {path}: Could not load this library: {path}")
    assert _passes(torchao, f"Failed to load {site}/_C.abi3.so: undefined symbol")
    assert _passes(torchao, "some other torchao warning")
    enum_message = (
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque "
        "value type. Calling register_constant() on Enum subclasses is deprecated and will "
        "be an error in a future release."
    )
    assert not _passes(pytree, enum_message, "<enum 'KernelPreference'>")
    assert _passes(pytree, "register_constant(%s) failed", "X")
