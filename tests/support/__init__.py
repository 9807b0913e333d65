"""Helpers shared by the tests: stand-ins, tiny models, launchers. What the GPU check
(``benchmarks/``) runs too, the S2 references and harness, is ``s2_harness/``."""
