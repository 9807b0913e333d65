"""``gpu_check`` section ``memory_features``: S2-Attn next to the memory features that need
a GPU (docs/configs.md, "Axolotl's memory features next to the plugin").

Each case trains one step of a tiny S2 model (``s2_harness.models``: Llama 4/2 heads,
packed rows, group 8) in bf16 with the feature and without it, applied the way Axolotl
applies it, and compares the loss and every gradient (relative L2 <= 2e-2, the bf16
tolerance of ``numerics_models``). S2 must still be on with the feature: the model's
backend is S2's, and its loss differs from full attention's on the same rows.

* ``activation_offloading``: TRL's ``get_act_offloading_ctx_manager`` (what Axolotl's
  ``activation_offloading: true`` uses) around forward and backward, gradient
  checkpointing on; also the peak CUDA memory with and without it.
* ``cut_cross_entropy``: ``cce_patch("llama")`` from cut-cross-entropy (Axolotl's fork or
  Apple's), the class-level forward replacement Axolotl's plugin makes.
* ``liger``: ``apply_liger_kernel_to_llama`` with RMSNorm, RoPE, SwiGLU and fused linear
  cross-entropy, as Axolotl's Liger plugin does.

Without CUDA (``--smoke`` on CPU) each case runs its reference half (the S2 model without
the feature) and reports itself skipped. A missing package is a skipped case too. The
patches are class-level; each case restores transformers' Llama module afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from longlora_plugin import enable_s2_attn
from longlora_plugin.s2.backend import s2_settings
from s2_harness.models import GROUP, configs, model_inputs

RTOL = 2e-2
CASES = ("activation_offloading", "cut_cross_entropy", "liger")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def restored_llama():
    """Undo class-level patches (CCE, Liger) of transformers' Llama module on exit."""
    from transformers.models.llama import modeling_llama

    names = dict(vars(modeling_llama))
    classes = {
        cls: dict(vars(cls)) for cls in (modeling_llama.LlamaForCausalLM, modeling_llama.LlamaModel)
    }
    try:
        yield modeling_llama
    finally:
        for name, value in names.items():
            setattr(modeling_llama, name, value)
        for cls, attrs in classes.items():
            if "forward" in attrs:
                cls.forward = attrs["forward"]


def build(device: str, *, s2: bool = True, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()["llama"], attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return enable_s2_attn(model, group_size=GROUP) if s2 else model


def step(model, device: str, context=contextlib.nullcontext) -> tuple[float, torch.Tensor]:
    """One training step on packed rows; ``(loss, all gradients as one vector)``."""
    inputs = {k: v.to(device) for k, v in model_inputs("packed")[0].items()}
    model.train()
    model.zero_grad(set_to_none=True)
    with context():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    grads = [p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None]
    return float(loss), torch.cat(grads)


def compare(device: str, apply, checkpointing: bool = False) -> dict:
    """The S2 model with ``apply(model) -> context factory`` against the S2 model without."""
    ref_loss, ref_grads = step(build(device, checkpointing=checkpointing), device)
    full_loss, _ = step(build(device, s2=False, checkpointing=checkpointing), device)
    result = {"loss_without": ref_loss, "loss_full_attention": full_loss}
    if device != "cuda":
        return {**result, "passed": None, "skipped": "needs CUDA (Triton kernels / streams)"}
    model = build(device, checkpointing=checkpointing)
    context = apply(model)
    loss, grads = step(model, device, context)
    result.update(
        loss_with=loss,
        loss_rel=abs(loss - ref_loss) / abs(ref_loss),
        grads_rel_l2=rel_l2(grads, ref_grads),
        s2_on=s2_settings(model) is not None,
        s2_differs_from_full=abs(ref_loss - full_loss) > 1e-4,
    )
    result["passed"] = bool(
        result["loss_rel"] <= RTOL
        and result["grads_rel_l2"] <= RTOL
        and result["s2_on"]
        and result["s2_differs_from_full"]
    )
    return result


def activation_offloading(device: str) -> dict:
    def apply(model):
        from trl.models.activation_offloading import get_act_offloading_ctx_manager

        return lambda: get_act_offloading_ctx_manager(model, use_streams=True)

    result = compare(device, apply, checkpointing=True)
    if device == "cuda" and result.get("passed") is not None:
        peaks = {}
        for name, offload in (("peak_bytes_without", False), ("peak_bytes_with", True)):
            model = build(device, checkpointing=True)
            ctx = apply(model) if offload else contextlib.nullcontext
            torch.cuda.reset_peak_memory_stats()
            step(model, device, ctx)
            peaks[name] = torch.cuda.max_memory_allocated()
        result.update(peaks)
    return result


def cut_cross_entropy(device: str) -> dict:
    def apply(model):
        try:
            from cut_cross_entropy.transformers.patch import cce_patch
        except ImportError:
            from cut_cross_entropy.transformers import cce_patch
        cce_patch("llama")
        return contextlib.nullcontext

    with restored_llama():
        return compare(device, apply)


def liger(device: str) -> dict:
    def apply(model):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=model
        )
        return contextlib.nullcontext

    with restored_llama():
        return compare(device, apply)


def memory_features(report, entry: dict, device: str, smoke: bool) -> None:
    """Run every case of :data:`CASES` as one fail-soft case of ``entry``."""
    checks = {
        "activation_offloading": activation_offloading,
        "cut_cross_entropy": cut_cross_entropy,
        "liger": liger,
    }
    for name in CASES:
        record = {"feature": name}

        def run(name=name):
            try:
                return checks[name](device)
            except ImportError as err:
                return {"passed": None, "skipped": f"not installed: {err}"}

        result = report.case(entry, record, run)
        status = {True: "PASS", False: "FAIL", None: "SKIPPED"}[result["passed"]]
        detail = (
            result.get("skipped")
            or result.get("error")
            or (
                f"loss {result.get('loss_with')} vs {result.get('loss_without')}, grads rel "
                f"{result.get('grads_rel_l2', float('nan')):.1e}"
            )
        )
        print(f"  {name:22s} {status}  {detail}", flush=True)
    cases = entry.get("cases", [])
    entry["passed"] = sum(c["passed"] is True for c in cases)
    entry["failed"] = sum(c["passed"] is False for c in cases)
    entry["skipped"] = sum(c["passed"] is None for c in cases)
