"""Multi-process ``axolotl train`` on CPU for the tests: ranks with the environment of
``torch.distributed.run`` (gloo), what ``axolotl train cfg.yml --launcher torchrun --
--nproc_per_node 2`` runs, with the CPU shims of ``cpu_ranks_plugin`` and the per-rank
records of ``rank_probe_plugin``. The ranks are forked from a server that has imported
Axolotl already (``prefork.py``); the runs that test the launcher itself (a rank killed
and the run resumed) go through the real ``torch.distributed.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from longlora_plugin.offline import OFFLINE_ENV
from tests.support import prefork
from tests.support.tiny_models import LORA_R4, TRAIN_SHORT

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900
PLUGINS = [
    "longlora_plugin.LongLoRAPlugin",
    "tests.support.cpu_ranks_plugin.CpuRanksPlugin",
    "tests.support.rank_probe_plugin.RankProbePlugin",
]
ZERO = {
    stage: str(REPO / "example_configs" / "deepspeed" / f"zero{stage}.json") for stage in (2, 3)
}


def lora_config(base: Path, dataset: Path, work: Path, **extra: Any) -> dict[str, Any]:
    """A tiny LoRA + LongLoRA config (S2 G=64, RoPE linear x4, embed/norm in full)."""
    return {
        "base_model": str(base),
        "plugins": PLUGINS,
        "longlora": {},
        "datasets": [{"path": str(dataset), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "output_dir": str(work / "out"),
        "sequence_len": 256,
        "sample_packing": True,
        **LORA_R4,
        **TRAIN_SHORT,
        "micro_batch_size": 1,
        **extra,
    }


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update({"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_module(
    module: str,
    *args: str,
    log: Path,
    ranks: int = 1,
    env: dict | None = None,
    check=True,
    launcher: str = "prefork",
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> *args`` in ``log``'s folder, on ``ranks`` processes with
    the environment ``torch.distributed.run`` gives its workers when ``ranks > 1``;
    returns the CompletedProcess, its output also written to ``log``.

    ``launcher="prefork"`` forks the processes from a server that has already imported
    Axolotl (``tests/support/prefork.py``: 7-10 s of CPU less per process);
    ``launcher="torchrun"`` runs the real ``python -m torch.distributed.run`` (or plain
    ``python -m`` for one rank), as a user's ``axolotl train --launcher torchrun`` does."""
    env = env or environment()
    if launcher == "prefork":
        cmd = ["prefork", "-m", module, *args]
        done = prefork.Server.get(env).launch(
            module, list(args), ranks=ranks, env=env, cwd=log.parent, log=log, timeout=TIMEOUT_S
        )
        if done.get("timed_out"):
            raise subprocess.TimeoutExpired(cmd, TIMEOUT_S, output=log.read_text())
        proc = subprocess.CompletedProcess(cmd, done["returncode"], log.read_text(errors="replace"))
    else:
        cmd = [sys.executable, "-m"]
        if ranks > 1:
            cmd += ["torch.distributed.run", "--nproc_per_node", str(ranks)]
            cmd += ["--master_addr", "127.0.0.1", "--master_port", str(prefork.free_port()), "-m"]
        cmd += [module, *args]
        proc = subprocess.run(
            cmd,
            cwd=log.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
        log.write_text(proc.stdout)
    if check:
        assert proc.returncode == 0, (
            f"{module} failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}"
        )
    return proc


def axolotl(
    module: str,
    cfg_path: Path,
    *args: str,
    ranks: int = 1,
    env: dict | None = None,
    check=True,
    launcher: str = "prefork",
) -> subprocess.CompletedProcess:
    """Run ``python -m axolotl.cli.<module> cfg *args`` (see :func:`run_module`); the log
    goes to ``<cfg>.<module>.log``."""
    log = cfg_path.with_suffix(f".{module}.log")
    return run_module(
        f"axolotl.cli.{module}",
        str(cfg_path),
        *args,
        log=log,
        ranks=ranks,
        env=env,
        check=check,
        launcher=launcher,
    )


def axolotl_together(module: str, cfg_paths: list[Path]) -> list[str]:
    """``python -m axolotl.cli.<module> cfg`` for every config at once, one process each
    (forked from the prefork server; 2 cores overlap their single-threaded parts); asserts
    each succeeded and returns their logs (``<cfg>.<module>.log``)."""
    env = environment()
    server = prefork.Server.get(env)
    logs = [cfg.with_suffix(f".{module}.log") for cfg in cfg_paths]
    launches = [
        server.start(
            f"axolotl.cli.{module}",
            [str(cfg)],
            ranks=1,
            env=env,
            cwd=cfg.parent,
            log=log,
            timeout=TIMEOUT_S,
        )  # fmt: skip
        for cfg, log in zip(cfg_paths, logs, strict=True)
    ]
    done = [server.wait(launch) for launch in launches]
    texts = [log.read_text(errors="replace") for log in logs]
    for cfg, result, text in zip(cfg_paths, done, texts, strict=True):
        assert result["returncode"] == 0, f"{cfg} failed ({result}):\n{text[-8000:]}"
    return texts


def fsdp2_train(base: Path, dataset: Path, out: Path, *args: str, check=True):
    """Two ranks of ``tests/support/fsdp2_train.py`` (FSDP2 with the plugin's functions)."""
    out.mkdir(parents=True, exist_ok=True)
    return run_module(
        "tests.support.fsdp2_train",
        str(base),
        str(dataset),
        str(out),
        *args,
        log=out.parent / f"{out.name}.train.log",
        ranks=2,
        check=check,
    )


def train_two_ranks(cfg_path: Path, **env: str) -> str:
    """Train on two ranks (rank 0 prepares the dataset, the other waits); returns the log."""
    return axolotl("train", cfg_path, ranks=2, env=environment(**env)).stdout


def probe_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "rank_probe").glob("rank*.json"))]
