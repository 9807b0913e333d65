"""Helpers shared by the tests (and the GPU check): references, stand-ins, tiny models."""
