"""Tests of the CPU demo."""
