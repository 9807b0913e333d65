"""Tests of the Axolotl adapter (real axolotl runs)."""
