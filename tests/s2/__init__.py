"""Tests of S2-Attn."""
