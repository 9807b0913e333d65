"""Tests of the longlora commands."""
