"""What the S2 tests (``tests/s2/``) and the GPU check (``benchmarks/gpu_check.py``) both
run S2-Attn against, outside ``tests/`` so that the benchmarks never import the tests
(not installed; the repository root is on the path of both):

* :mod:`s2_harness.reference`: an independent dense reference, from the semantics alone;
* :mod:`s2_harness.calls`: one S2 attention call outside a model, on every training path;
* :mod:`s2_harness.models`: whole tiny models, inputs in three row layouts, a
  dense-reference attention backend;
* :mod:`s2_harness.varlen_contracts`: CPU stand-ins of the two CUDA varlen kernels.
"""
