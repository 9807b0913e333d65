"""GPU-only checks of S2-Attn: CUDA numerics against the dense reference, and bf16 cost.

One script for a short device lease. Every section (and every case inside one) fails
soft: the error is recorded and the script goes on. Results are written to the JSON file
after every case, so a run cut short still leaves what it measured.

Sections:

* ``preflight``: versions, GPU, whether flash-attn is importable, SDPA kernels enabled.
* ``numerics_function``: ``s2_attention_forward`` (through ``s2_harness.calls.run_s2``)
  vs the independent dense reference (``s2_harness/reference.py``) computed in float64 on the
  same inputs, sdpa and eager, fp32 (TF32 off; max abs error <= 1e-5, as on CPU) and bf16
  (relative L2 error <= 1e-2 against the float64 reference on the bf16-rounded inputs);
  outputs and q/k/v gradients; plain / padded (left and right) / packed rows, GQA, MQA,
  odd head counts, a sliding window; sdpa also with the kernel pinned (flash for bf16,
  memory-efficient for fp32).
* ``numerics_models``: whole tiny models of ``s2_harness.models.configs()`` (Llama 4/2,
  9/3, 4/1, Mistral with window, Qwen2, Qwen3, Phi-3), S2 model vs a float64 copy of it
  running the dense reference; logits and every parameter's gradient. fp32: max abs <= 1e-5.
  bf16: relative L2 <= 2e-2 (logits, all gradients as one vector), reported next to the
  same error of the model *without* S2 (plain causal attention in bf16 vs float64), which
  is what bf16 costs anyway.
* ``eval_identity``: eval-mode S2-enabled model == the plain model, bit for bit.
* ``speed``: bf16 training step (forward+backward with LM loss) of full attention (sdpa),
  S2-Attn (G = L/4) with the kernel S2 picks (PyTorch's varlen kernel on CUDA in bf16),
  S2-Attn forced onto SDPA per group (the path before the varlen kernel), S2-Attn on the
  same tokens packed as three documents, and ideal grouped (the same tokens as 4 rows of
  L/4); eval forward with S2 enabled vs plain, CUDA-event timings (median), peak memory.
  Models: a SmolLM2-135M-shaped model with gradient checkpointing, 2 decoder layers shaped
  like Llama-2-7B, the benchmark's 2-layer Llama (``s2_attn_bench.build``). Rows are ordered
  by importance and skipped when they would overrun ``--deadline``.
* ``launches``: CUDA kernels per decoder layer per training step, full vs S2
  (``benchmarks/s2_launches.py``), SmolLM2's 9/3 heads and 32/32 heads.
* ``memory_features``: S2 next to the memory features that need a GPU (activation
  offloading, Cut Cross Entropy, Liger): loss and gradients with and without each
  (``benchmarks/gpu_memory_features.py``).

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out gpu_check.json
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_check --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from benchmarks.gpu_memory_features import memory_features
from benchmarks.s2_attn_bench import build as build_bench_model
from longlora_plugin import disable_s2_attn, enable_s2_attn
from longlora_plugin.s2 import backend as s2_backend
from longlora_plugin.s2.kernels import SDPA, select_kernel
from s2_harness.calls import run_s2
from s2_harness.models import GROUP as MODEL_GROUP
from s2_harness.models import configs, model_inputs
from s2_harness.reference import dense_attention, s2_allowed

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "model_configs"
FP32_ATOL = 1e-5
BF16_FUNCTION_RTOL = 1e-2
BF16_MODEL_RTOL = 2e-2
VARIANTS = ("full", "s2", "s2_pieces", "s2_packed", "grouped")
T0 = time.monotonic()


def stamp() -> str:
    return f"[{datetime.datetime.now().strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s]"


def log(*parts) -> None:
    print(stamp(), *parts, flush=True)


class Report:
    """The JSON result, rewritten (atomically) after every case."""

    def __init__(self, path: str):
        self.path = path
        self.data: dict = {"started": datetime.datetime.now().isoformat(), "sections": {}}
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - T0, 1)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def section(self, name: str):
        entry = self.data["sections"].setdefault(name, {})
        start = time.monotonic()
        log(f"== {name}")
        try:
            yield entry
        except Exception as err:  # fail soft: record and go on
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()
            log(f"!! {name} failed: {entry['error']}")
        finally:
            entry["seconds"] = round(time.monotonic() - start, 1)
            self.save()
            log(f"== {name} done in {entry['seconds']} s")

    def case(self, entry: dict, record: dict, fn) -> dict:
        """Run ``fn() -> dict`` into ``record``; an exception becomes ``record['error']``."""
        try:
            record.update(fn())
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=6)
            record["passed"] = False
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        entry.setdefault("cases", []).append(record)
        self.save()
        return record


def count(entry: dict) -> None:
    cases = entry.get("cases", [])
    entry["passed"] = sum(c["passed"] is True for c in cases)
    entry["failed"] = sum(c["passed"] is False for c in cases)
    entry["skipped"] = sum(c["passed"] is None for c in cases)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# --------------------------------------------------------------------------- preflight


def nvidia_smi() -> str:
    """Read-only snapshot of the card (clocks, power, temperature, memory)."""
    query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,memory.used"
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as err:
        return f"unavailable: {err}"


def preflight(entry: dict, device: str) -> None:
    import transformers

    entry["python"] = platform.python_version()
    entry["torch"] = torch.__version__
    entry["torch_cuda"] = torch.version.cuda
    entry["transformers"] = transformers.__version__
    entry["host"] = platform.node()
    entry["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        entry["gpu"] = props.name
        entry["capability"] = list(torch.cuda.get_device_capability(0))
        entry["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        entry["sdpa_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
        entry["nvidia_smi"] = nvidia_smi()
    packages = {}
    for name in ("flash_attn", "peft", "accelerate", "hypothesis", "pydantic", "axolotl"):
        try:
            module = importlib.import_module(name)
            packages[name] = getattr(module, "__version__", "importable")
        except Exception as err:
            packages[name] = f"not importable ({type(err).__name__}: {err})"
    entry["packages"] = packages
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        entry["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except Exception as err:
        entry["varlen_attn_signature"] = f"unavailable ({type(err).__name__}: {err})"
    entry["s2_kernel_bf16"] = select_kernel("sdpa", device, torch.bfloat16).name
    entry["s2_kernel_fp32"] = select_kernel("sdpa", device, torch.float32).name
    entry["flash_attn_importable"] = not packages["flash_attn"].startswith("not importable")
    log(
        f"torch {entry['torch']} (cuda {entry['torch_cuda']}), transformers {entry['transformers']}, "
        f"{entry.get('gpu', device)}; flash_attn: {packages['flash_attn']}; S2 kernel bf16: "
        f"{entry['s2_kernel_bf16']}, fp32: {entry['s2_kernel_fp32']}"
    )


@contextlib.contextmanager
def forced_kernel(kernel):
    """S2 on ``kernel`` whatever it would pick (None: its own choice)."""
    if kernel is None:
        yield
        return
    original = s2_backend.select_kernel
    s2_backend.select_kernel = lambda *args, **kwargs: kernel
    try:
        yield
    finally:
        s2_backend.select_kernel = original


def set_fp32_exact(device: str) -> dict:
    """TF32 off for the fp32 checks (matmul and cuDNN)."""
    torch.set_float32_matmul_precision("highest")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


# ------------------------------------------------------------------- function numerics


def function_cases(smoke: bool) -> list[dict]:
    """Shapes and layouts for the bare attention function (positions / validity per row)."""

    def packed(*docs):
        return [p for d in docs for p in range(d)]

    if smoke:
        return [
            dict(name="plain-gqa", heads=4, kv=2, dim=8, group=8, rows=[list(range(32))] * 2),
            dict(
                name="odd-9-3-padded-packed",
                heads=9,
                kv=3,
                dim=8,
                group=6,
                rows=[packed(10, 14) + [0] * 6, [0] * 5 + list(range(25))],
                valid=[[1] * 24 + [0] * 6, [0] * 5 + [1] * 25],
                window=5,
            ),
        ]
    return [
        dict(name="plain-gqa-8-2", heads=8, kv=2, dim=64, group=128, rows=[list(range(512))] * 2),
        dict(name="plain-odd-9-3", heads=9, kv=3, dim=64, group=64, rows=[list(range(300))]),
        dict(name="plain-d128", heads=4, kv=4, dim=128, group=256, rows=[list(range(1024))]),
        dict(
            name="padded-mqa-4-1",
            heads=4,
            kv=1,
            dim=64,
            group=48,
            rows=[list(range(186)) + [0] * 70, [0] * 33 + list(range(223))],
            valid=[[1] * 186 + [0] * 70, [0] * 33 + [1] * 223],
        ),
        dict(
            name="packed-6-2",
            heads=6,
            kv=2,
            dim=64,
            group=64,
            rows=[packed(100, 200, 84), packed(50, 300, 34)],
        ),
        dict(
            name="packed-padded-window-6-3",
            heads=6,
            kv=3,
            dim=64,
            group=64,
            rows=[packed(90, 120) + [0] * 46, packed(7, 240) + [0] * 9],
            valid=[[1] * 210 + [0] * 46, [1] * 247 + [0] * 9],
            window=40,
        ),
    ]


def check_function_case(case: dict, backend: str, dtype, device: str, pin) -> dict:
    heads, kv, dim, group = case["heads"], case["kv"], case["dim"], case["group"]
    pos_cpu = torch.tensor(case["rows"])
    batch, length = pos_cpu.shape
    valid_cpu = (
        torch.tensor(case["valid"], dtype=torch.bool)
        if "valid" in case
        else torch.ones(batch, length, dtype=torch.bool)
    )
    window = case.get("window")
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    base = [
        torch.randn(batch, h, length, dim, generator=gen) for h in (heads, kv, kv)
    ]  # fresh random inputs per case
    weight = torch.randn(batch, length, heads, dim, generator=gen) * valid_cpu[:, :, None, None]
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in base)
    weight_t = weight.to(device=device, dtype=dtype)
    pos, valid = pos_cpu.to(device), valid_cpu.to(device)
    with pin():
        out = run_s2(backend, q, k, v, group, pos, valid if "valid" in case else None, window)
        (out * weight_t).sum().backward()
    sync(device)
    mine = [out.detach(), q.grad, k.grad, v.grad]

    # float64 reference on the very same (possibly bf16-rounded) inputs
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    allowed = s2_allowed(pos_cpu, valid_cpu, heads, group, window).to(device)
    ref = dense_attention(q64, k64, v64, allowed, dim**-0.5)
    (ref * weight_t.double()).sum().backward()
    theirs = [ref.detach(), q64.grad, k64.grad, v64.grad]

    keep = valid[:, :, None, None]
    result = {
        "padding_outputs_zero": bool(torch.all(mine[0][~valid] == 0)),
        "finite": all(bool(torch.isfinite(t).all()) for t in mine),
    }
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, mine, theirs, strict=True):
        if name == "out":
            a, b = a * keep, b * keep
        result[f"{name}_max_abs"] = max_abs(a, b)
        result[f"{name}_rel_l2"] = rel_l2(a, b)
    if dtype == torch.float32:
        result["tolerance"] = f"max abs <= {FP32_ATOL}"
        ok = all(result[f"{n}_max_abs"] <= FP32_ATOL for n in names)
    else:
        result["tolerance"] = f"rel L2 <= {BF16_FUNCTION_RTOL} vs float64"
        ok = all(result[f"{n}_rel_l2"] <= BF16_FUNCTION_RTOL for n in names)
    result["passed"] = bool(ok and result["padding_outputs_zero"] and result["finite"])
    return result


def pinned_check(case, backend, dtype, device, pin, pinned: bool) -> dict:
    """A pinned SDPA kernel may refuse some inputs (e.g. GQA): that is a skip, not a failure."""
    try:
        return check_function_case(case, backend, dtype, device, pin)
    except RuntimeError as err:
        if pinned and "No available kernel" in str(err):
            return {"passed": None, "skipped": f"pinned kernel refuses these inputs: {err}"[:300]}
        raise


@contextlib.contextmanager
def _pinned(kernel):
    """SDPA pinned to one CUDA kernel; S2 forced onto SDPA per group so the pin matters."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(kernel), forced_kernel(SDPA):
        yield


def numerics_function(report: Report, entry: dict, device: str, smoke: bool) -> None:
    entry["tf32"] = set_fp32_exact(device)
    dtypes = [torch.float32, torch.bfloat16]
    for case in function_cases(smoke):
        for backend in ("sdpa", "eager"):
            for dtype in dtypes:
                pins = [("default", contextlib.nullcontext)]
                if device == "cuda" and backend == "sdpa" and dtype == torch.bfloat16:
                    pins.append(("s2-per-group", lambda: forced_kernel(SDPA)))
                if device == "cuda" and backend == "sdpa" and case.get("window") is None:
                    from torch.nn.attention import SDPBackend

                    kernel = (
                        SDPBackend.FLASH_ATTENTION
                        if dtype == torch.bfloat16
                        else SDPBackend.EFFICIENT_ATTENTION
                    )
                    pins.append((kernel.name.lower(), lambda k=kernel: _pinned(k)))
                for pin_name, pin in pins:
                    record = {
                        "case": case["name"],
                        "backend": backend,
                        "dtype": str(dtype).removeprefix("torch."),
                        "sdpa_kernel": pin_name if backend == "sdpa" else None,
                    }
                    r = report.case(
                        entry,
                        record,
                        lambda c=case, b=backend, d=dtype, p=pin, n=pin_name: pinned_check(
                            c, b, d, device, p, n != "default"
                        ),
                    )
                    log(
                        f"  {r['case']:26s} {backend:5s} {record['dtype']:8s} {pin_name:19s} "
                        + (
                            f"out abs {r['out_max_abs']:.1e} rel {r['out_rel_l2']:.1e}  "
                            f"grads rel {max(r['dq_rel_l2'], r['dk_rel_l2'], r['dv_rel_l2']):.1e}  "
                            if "out_max_abs" in r
                            else r.get("error", r.get("skipped", ""))[:160]
                        )
                        + {True: "PASS", False: "FAIL", None: "SKIP"}[r["passed"]]
                    )
    count(entry)


# ---------------------------------------------------------------------- model numerics


def reference_backend(group: int) -> str:
    """Dense S2 reference backend (s2_harness/reference.py) usable on any device: the mask is
    built on the CPU from the positions and padding, then moved to the query's device."""
    name = f"s2_reference_anydevice_g{group}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        batch, heads, length, _ = query.shape
        pos = kwargs["position_ids"].expand(batch, length).cpu()
        valid = (
            torch.ones(batch, length, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool().cpu()
        )
        allowed = s2_allowed(pos, valid, heads, group, kwargs.get("sliding_window"))
        return dense_attention(query, key, value, allowed.to(query.device), kwargs["scaling"]), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, lambda **kw: kw.get("attention_mask"))
    return name


def forward_backward(model, inputs: dict, valid: torch.Tensor, weight: torch.Tensor):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits * weight.to(logits.dtype)).sum().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return (logits.detach().double() * valid[..., None]), grads


def compare_model_runs(mine, theirs) -> dict:
    logits_a, grads_a = mine
    logits_b, grads_b = theirs
    if grads_a.keys() != grads_b.keys():
        raise AssertionError("different parameters received gradients")
    per_param = {
        n: (max_abs(grads_a[n], grads_b[n]), rel_l2(grads_a[n], grads_b[n])) for n in grads_a
    }
    worst_abs = max(per_param, key=lambda n: per_param[n][0])
    worst_rel = max(per_param, key=lambda n: per_param[n][1])
    flat_a = torch.cat([g.reshape(-1) for g in grads_a.values()])
    flat_b = torch.cat([grads_b[n].reshape(-1) for n in grads_a])
    return {
        "logits_max_abs": max_abs(logits_a, logits_b),
        "logits_rel_l2": rel_l2(logits_a, logits_b),
        "grads_max_abs": per_param[worst_abs][0],
        "grads_max_abs_param": worst_abs,
        "grads_rel_l2": rel_l2(flat_a, flat_b),
        "grads_worst_param_rel_l2": per_param[worst_rel][1],
        "grads_worst_rel_param": worst_rel,
        "finite": bool(torch.isfinite(logits_a).all())
        and all(bool(torch.isfinite(g).all()) for g in grads_a.values()),
    }


def check_model_case(arch: str, layout: str, backend: str, dtype, device: str) -> dict:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(configs()[arch], attn_implementation=backend)
    base = base.to(device=device, dtype=dtype)
    reference = copy.deepcopy(base).to(torch.float64)  # exact upcast of the tested weights
    inputs_cpu, valid_cpu = model_inputs(layout)
    inputs = {k: v.to(device) for k, v in inputs_cpu.items()}
    valid = valid_cpu.to(device)
    shape = (*valid.shape, base.config.vocab_size)
    weight = (
        0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(2)) * valid_cpu[..., None]
    ).to(device=device, dtype=dtype)
    result = {}
    if dtype != torch.float32:  # what bf16 costs without S2 (plain causal attention)
        control = compare_model_runs(
            forward_backward(base, inputs, valid, weight),
            forward_backward(reference, inputs, valid, weight),
        )
        result["control_no_s2_logits_rel_l2"] = control["logits_rel_l2"]
        result["control_no_s2_grads_rel_l2"] = control["grads_rel_l2"]
    reference.set_attn_implementation(reference_backend(MODEL_GROUP))
    enable_s2_attn(base, group_size=MODEL_GROUP)
    result.update(
        compare_model_runs(
            forward_backward(base, inputs, valid, weight),
            forward_backward(reference, inputs, valid, weight),
        )
    )
    if dtype == torch.float32:
        result["tolerance"] = f"max abs <= {FP32_ATOL} (logits and every gradient)"
        ok = result["logits_max_abs"] <= FP32_ATOL and result["grads_max_abs"] <= FP32_ATOL
    else:
        result["tolerance"] = f"rel L2 <= {BF16_MODEL_RTOL} vs float64 (logits; all gradients)"
        ok = (
            result["logits_rel_l2"] <= BF16_MODEL_RTOL and result["grads_rel_l2"] <= BF16_MODEL_RTOL
        )
    result["passed"] = bool(ok and result["finite"])
    return result


def numerics_models(report: Report, entry: dict, device: str, smoke: bool) -> None:
    entry["tf32"] = set_fp32_exact(device)
    archs = list(configs())
    layouts = ("plain", "padded", "packed")
    plan = [(a, lay, "sdpa", torch.float32) for a in archs for lay in layouts]
    plan += [
        (a, lay, "eager", torch.float32)
        for a in ("llama-9-3", "mistral-window", "qwen2")
        for lay in layouts
    ]
    bf16_archs = ("llama", "llama-9-3", "llama-mqa", "mistral-window", "qwen3")
    plan += [(a, lay, "sdpa", torch.bfloat16) for a in bf16_archs for lay in layouts]
    plan += [(a, lay, "eager", torch.bfloat16) for a in ("llama-9-3",) for lay in layouts]
    if smoke:
        plan = [p for p in plan if p[0] == "llama-9-3" and p[1] != "padded"]
    for arch, layout, backend, dtype in plan:
        record, r = _model_case(
            report, entry, check_model_case, arch, layout, backend, dtype, device
        )
        detail = (
            f"logits abs {r['logits_max_abs']:.1e} rel {r['logits_rel_l2']:.1e}  grads abs "
            f"{r['grads_max_abs']:.1e} rel {r['grads_rel_l2']:.1e}"
            + (
                f"  (no-S2 bf16 control rel {r['control_no_s2_logits_rel_l2']:.1e}/{r['control_no_s2_grads_rel_l2']:.1e})"
                if "control_no_s2_logits_rel_l2" in r
                else ""
            )
            if "logits_max_abs" in r
            else r.get("error", "")
        )
        log(
            f"  {arch:15s} {layout:6s} {backend:5s} {record['dtype']:8s} {detail}  {'PASS' if r['passed'] else 'FAIL'}"
        )
    count(entry)


def _model_case(
    report: Report, entry: dict, check, arch: str, layout: str, backend: str, dtype, device: str
) -> tuple[dict, dict]:
    """Run ``check(arch, layout, backend, dtype, device)`` as one fail-soft case of
    ``entry``; returns the case's identifying record and its result."""
    record = {
        "arch": arch,
        "layout": layout,
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return record, report.case(entry, record, lambda: check(arch, layout, backend, dtype, device))


def check_eval_identity(arch: str, layout: str, backend: str, dtype, device: str) -> dict:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(configs()[arch], attn_implementation=backend)
    base = base.to(device=device, dtype=dtype).eval()
    s2 = enable_s2_attn(copy.deepcopy(base), group_size=MODEL_GROUP).eval()
    inputs = {k: v.to(device) for k, v in model_inputs(layout)[0].items()}
    with torch.no_grad():
        a, b = s2(**inputs).logits, base(**inputs).logits
    return {
        "bit_identical": bool(torch.equal(a, b)),
        "max_abs": max_abs(a, b),
        "passed": bool(torch.equal(a, b)),
    }


def eval_identity(report: Report, entry: dict, device: str, smoke: bool) -> None:
    plan = [
        (a, lay, b, d)
        for a in ("mistral-window", "llama-9-3")
        for b in ("sdpa", "eager")
        for d in (torch.float32, torch.bfloat16)
        for lay in ("plain", "padded", "packed")
    ]
    if smoke:
        plan = plan[:4]
    for arch, layout, backend, dtype in plan:
        record, r = _model_case(
            report, entry, check_eval_identity, arch, layout, backend, dtype, device
        )
        log(
            f"  {arch:15s} {layout:6s} {backend:5s} {record['dtype']:8s} "
            + (
                "bit-identical"
                if r.get("bit_identical")
                else r.get("error", f"differs by {r.get('max_abs')}")
            )
        )
    count(entry)


# ------------------------------------------------------------------------------- speed


def speed_specs(smoke: bool) -> dict[str, dict]:
    shrink = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256} if smoke else {}
    return {
        "SmolLM2-135M": {
            "fixture": "SmolLM2-135M",
            "overrides": {**shrink, "num_hidden_layers": 2} if smoke else {},
            "checkpointing": True,
        },
        "Llama-2-7B-2L": {
            "fixture": "Llama-2-7b-hf",
            "overrides": {**shrink, "num_hidden_layers": 1 if smoke else 2},
            "checkpointing": False,
        },
        "bench-2L-h256": {"bench": True, "checkpointing": False},
    }


def build_speed_model(spec: dict, length: int, device: str, dtype):
    if spec.get("bench"):
        model = build_bench_model("sdpa", length, device, dtype, "full")
    else:
        config = AutoConfig.from_pretrained(FIXTURES / spec["fixture"])
        for key, value in spec["overrides"].items():
            setattr(config, key, value)
        config.max_position_embeddings = max(length, config.max_position_embeddings)
        config.use_cache = False
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa", dtype=dtype
            )
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def set_variant(model, variant: str, length: int) -> None:
    if variant.startswith("s2"):
        enable_s2_attn(model, group_size=length // 4)
    else:
        disable_s2_attn(model)


def variant_inputs(ids: torch.Tensor, length: int) -> dict[str, dict]:
    """Model inputs per variant: one row, the same row as 4 rows of L/4 (grouped), or the
    same row packed as three documents (position_ids restart, as sample packing does)."""
    docs = [3 * length // 8, 3 * length // 8, length - 6 * length // 8]
    packed = torch.cat([torch.arange(n) for n in docs])[None].to(ids.device)
    row = {"input_ids": ids}
    return {
        "full": row,
        "s2": row,
        "s2_pieces": row,
        "s2_packed": {"input_ids": ids, "position_ids": packed},
        "grouped": {"input_ids": ids.view(4, length // 4)},
    }


def train_step(model, inputs: dict, variant: str = "full") -> None:
    with forced_kernel(SDPA if variant == "s2_pieces" else None):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.zero_grad(set_to_none=True)


HOST_MS: list[float] = []  # host time to issue the last timed call (see timed_ms)


def timed_ms(fn, device: str) -> float:
    """Device time of ``fn()`` by CUDA events (host clock on CPU). Also appends to
    ``HOST_MS`` the host time until ``fn`` returned: close to the device time means the
    step is bound by the host (Python, launches, syncs), not by the GPU."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        HOST_MS.append((time.perf_counter() - start) * 1e3)
        return HOST_MS[-1]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    fn()
    end.record()
    HOST_MS.append((time.perf_counter() - host) * 1e3)
    end.synchronize()
    return start.elapsed_time(end)


def summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "samples_ms": samples}


def speed_row(model, spec_name: str, length: int, device: str, args) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    inputs = variant_inputs(ids, length)
    cuda = device == "cuda"
    row: dict = {"model": spec_name, "length": length, "group": length // 4}
    if cuda:
        row["static_bytes"] = torch.cuda.memory_allocated()
    model.train()
    warm = {}
    for variant in VARIANTS:  # warm-up, also sizes the repeats
        set_variant(model, variant, length)
        warm[variant] = timed_ms(lambda v=variant: train_step(model, inputs[v], v), device)
    row["warmup_ms"] = warm
    step_s = sum(warm.values()) / 1e3
    left = args.deadline - (time.monotonic() - T0)
    repeats = int(min(args.row_budget, max(left, 0) / 2) / max(step_s * 1.6, 1e-6))
    repeats = max(args.min_repeats, min(args.max_repeats, repeats))
    row["repeats"] = repeats
    times = {v: [] for v in VARIANTS}
    host = {v: [] for v in VARIANTS}
    mem_rise, mem_peak = {}, {}
    for r in range(repeats):  # interleaved, rotating which variant goes first
        shift = r % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            set_variant(model, variant, length)
            if cuda and r == 0:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            times[variant].append(
                timed_ms(lambda v=variant: train_step(model, inputs[v], v), device)
            )
            host[variant].append(HOST_MS[-1])
            if cuda and r == 0:
                mem_peak[variant] = torch.cuda.max_memory_allocated()
                mem_rise[variant] = mem_peak[variant] - before
    row["train"] = {v: summary(times[v]) for v in VARIANTS}
    row["host_issue_median_ms"] = {v: statistics.median(host[v]) for v in VARIANTS}
    row["mem_rise_bytes"] = mem_rise or None
    row["mem_peak_bytes"] = mem_peak or None
    # eval: S2 enabled but module.training false vs the plain model; alternate the order
    model.eval()
    evals = {"plain": [], "s2_enabled": []}
    with torch.no_grad():
        logits = {}
        for i in range(repeats + 1):
            for name in sorted(evals, reverse=bool(i % 2)):
                set_variant(model, "s2" if name == "s2_enabled" else "full", length)
                if i == 0:  # warm-up round, also the bit-identity check
                    logits[name] = model(input_ids=ids).logits
                    continue
                evals[name].append(timed_ms(lambda: model(input_ids=ids), device))
        row["eval_bit_identical"] = bool(torch.equal(logits["plain"], logits["s2_enabled"]))
        del logits
    disable_s2_attn(model)
    row["eval"] = {k: summary(v) for k, v in evals.items()}
    med = {v: row["train"][v]["median_ms"] for v in VARIANTS}
    row["s2_over_full"] = med["s2"] / med["full"]
    row["s2_over_grouped"] = med["s2"] / med["grouped"]
    row["s2_pieces_over_grouped"] = med["s2_pieces"] / med["grouped"]
    row["s2_packed_over_s2"] = med["s2_packed"] / med["s2"]
    row["eval_s2_over_plain"] = (
        row["eval"]["s2_enabled"]["median_ms"] / row["eval"]["plain"]["median_ms"]
    )
    if mem_rise:
        row["mem_rise_s2_over_full"] = mem_rise["s2"] / mem_rise["full"]
    return row


def speed(report: Report, entry: dict, device: str, args) -> None:
    dtype = torch.bfloat16
    specs = speed_specs(args.smoke)
    lengths = args.lengths
    main, extra = lengths[:-1], lengths[-1:]
    plan = [(s, n) for s in specs for n in main] + [(s, n) for s in specs for n in extra]
    entry["plan"] = [f"{s}@{n}" for s, n in plan]
    entry["rows"] = []
    entry["skipped"] = []
    model, model_name, last_row_s = None, None, {}
    for spec_name, length in plan:
        elapsed = time.monotonic() - T0
        predicted = last_row_s.get(spec_name, 20.0) * 2.5
        if elapsed + predicted > args.deadline:
            entry["skipped"].append(
                f"{spec_name}@{length}: predicted {predicted:.0f}s, {args.deadline - elapsed:.0f}s left"
            )
            log(f"  skip {spec_name} L={length} (time budget)")
            report.save()
            continue
        start = time.monotonic()
        try:
            if model_name != spec_name:
                model = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                model = build_speed_model(specs[spec_name], max(lengths), device, dtype)
                model_name = spec_name
            row = speed_row(model, spec_name, length, device, args)
        except Exception as err:
            row = {
                "model": spec_name,
                "length": length,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=8),
            }
            if isinstance(err, torch.cuda.OutOfMemoryError):
                model, model_name = None, None
                gc.collect()
                torch.cuda.empty_cache()
        row["seconds"] = round(time.monotonic() - start, 1)
        last_row_s[spec_name] = row["seconds"]
        entry["rows"].append(row)
        report.save()
        log(
            "  "
            + (
                format_speed_row(row)
                if "error" not in row
                else f"{spec_name} L={length}: {row['error']}"
            )
        )
    if device == "cuda":
        entry["nvidia_smi_after"] = nvidia_smi()


def gib(x) -> str:
    return f"{x / 2**30:.2f}"


def format_speed_row(row: dict) -> str:
    t = {v: row["train"][v]["median_ms"] for v in VARIANTS}
    mem = row.get("mem_rise_bytes") or {}
    peak = row.get("mem_peak_bytes") or {}
    mem_s = " / ".join(gib(mem[v]) for v in VARIANTS) if mem else "n/a"
    peak_s = " / ".join(gib(peak[v]) for v in VARIANTS) if peak else "n/a"
    return (
        f"| {row['model']} | {row['length']} | {t['full']:.1f} | {t['s2']:.1f} | "
        f"{t['s2_pieces']:.1f} | {t['s2_packed']:.1f} | {t['grouped']:.1f} | "
        f"{row['s2_over_full']:.2f} | {row['s2_over_grouped']:.2f} | "
        f"{row['s2_pieces_over_grouped']:.2f} | {row['s2_packed_over_s2']:.2f} | "
        f"{row['eval']['plain']['median_ms']:.1f} | {row['eval_s2_over_plain']:.3f} | "
        f"{'yes' if row['eval_bit_identical'] else 'NO'} | {mem_s} | {peak_s} | {row['repeats']} |"
    )


SPEED_HEADER = (
    "| model | L | full ms | S2 ms | S2 per-group ms | S2 packed ms | grouped ms | S2/full | "
    "S2/grouped | S2 per-group/grouped | S2 packed/S2 | eval plain ms | eval S2-off/plain | "
    "eval bit-identical | step mem rise GiB (" + " / ".join(VARIANTS) + ") | "
    "peak allocated GiB (" + " / ".join(VARIANTS) + ") | repeats |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def launches(entry: dict, device: str, smoke: bool) -> None:
    """CUDA kernels (CPU kernel calls on CPU) per decoder layer, full vs S2 (s2_launches)."""
    from types import SimpleNamespace

    from benchmarks import s2_launches

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    entry["rows"] = []
    for heads, kv in ((9, 3), (32, 32)):
        args = SimpleNamespace(
            layers=1 if smoke else 2,
            heads=heads,
            kv_heads=kv,
            backend="sdpa",
            device=device,
            dtype=dtype,
            length=256 if smoke else 8192,
        )
        for layout in s2_launches.LAYOUTS:
            full = s2_launches.per_layer(args, layout, False)
            s2 = s2_launches.per_layer(args, layout, True)
            row = {
                "heads": f"{heads}/{kv}",
                "layout": layout,
                "length": args.length,
                "full": full,
                "s2": s2,
            }
            entry["rows"].append(row)
            log(
                f"  {heads}/{kv} heads {layout:6s} L={args.length}: full {full:.0f}, S2 {s2:.0f} per layer"
            )


# -------------------------------------------------------------------------------- main


def print_summary(report: Report) -> None:
    sections = report.data["sections"]
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    pre = sections.get("preflight", {})
    print(
        f"{pre.get('gpu', pre.get('device'))}, torch {pre.get('torch')} (cuda {pre.get('torch_cuda')}), "
        f"transformers {pre.get('transformers')}, flash_attn importable: {pre.get('flash_attn_importable')}"
    )
    for name in ("numerics_function", "numerics_models", "eval_identity", "memory_features"):
        entry = sections.get(name, {})
        cases = entry.get("cases", [])
        line = (
            f"{name}: {entry.get('passed', 0)} passed, {entry.get('failed', 0)} failed, "
            f"{entry.get('skipped', 0)} skipped ({entry.get('seconds')} s)"
        )
        if "error" in entry:
            line += f"  SECTION ERROR: {entry['error']}"
        print(line)
        for dt in ("float32", "bfloat16"):
            sub = [c for c in cases if c.get("dtype") == dt and "out_max_abs" in c]
            sub += [c for c in cases if c.get("dtype") == dt and "logits_max_abs" in c]
            if not sub:
                continue
            keys = [
                k
                for k in sub[0]
                if k.endswith(("_max_abs", "_rel_l2")) and not k.startswith("control")
            ]
            worst = {k: max(c.get(k, 0.0) for c in sub) for k in keys}
            print(f"  {dt}: worst " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        for c in cases:
            if c["passed"] is not True:
                desc = {k: v for k, v in c.items() if k != "traceback"}
                label = "SKIPPED" if c["passed"] is None else "FAILED"
                print(f"  {label}: {json.dumps(desc, default=str)[:400]}")
    sp = sections.get("speed", {})
    print(
        f"speed ({sp.get('seconds')} s){'  SECTION ERROR: ' + sp['error'] if 'error' in sp else ''}"
    )
    print(SPEED_HEADER)
    for row in sp.get("rows", []):
        print(
            format_speed_row(row)
            if "error" not in row
            else f"| {row['model']} | {row['length']} | ERROR {row['error'][:200]} |"
        )
    for s in sp.get("skipped", []):
        print(f"skipped: {s}")
    for row in sections.get("launches", {}).get("rows", []):
        print(
            f"launches per layer, {row['heads']} heads, {row['layout']}: full {row['full']:.0f}, S2 {row['s2']:.0f}"
        )
    print(f"total {time.monotonic() - T0:.1f} s; JSON: {report.path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="JSON results file (rewritten after each case)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU in a minute")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="last one runs after all others"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from start; no speed row starts past it",
    )
    parser.add_argument(
        "--row-budget", type=float, default=8.0, help="seconds of timed steps per speed row"
    )
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=15)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=[
            "preflight",
            "numerics_function",
            "numerics_models",
            "eval_identity",
            "launches",
            "memory_features",
            "speed",
        ],
    )
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.lengths is None:
        args.lengths = [256, 512] if args.smoke else [8192, 16384, 32768]
    if args.deadline is None:
        args.deadline = 90.0 if args.smoke else 270.0
    if args.smoke:
        args.min_repeats, args.max_repeats = 2, 3
    report = Report(args.out)
    report.data["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    report.data["date"] = datetime.date.today().isoformat()
    report.data["settings"] = {k: v for k, v in vars(args).items() if k != "out"} | {
        "device": device
    }
    log(f"gpu_check on {device}; JSON -> {args.out}")
    steps = {
        "preflight": lambda e: preflight(e, device),
        "numerics_function": lambda e: numerics_function(report, e, device, args.smoke),
        "numerics_models": lambda e: numerics_models(report, e, device, args.smoke),
        "eval_identity": lambda e: eval_identity(report, e, device, args.smoke),
        "speed": lambda e: speed(report, e, device, args),
        "launches": lambda e: launches(e, device, args.smoke),
        "memory_features": lambda e: memory_features(report, e, device, args.smoke),
    }
    for name in args.sections:
        with report.section(name) as entry:
            steps[name](entry)
    report.data["finished"] = datetime.datetime.now().isoformat()
    report.save()
    print_summary(report)


if __name__ == "__main__":
    main()
