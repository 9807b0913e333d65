"""LongLoRA on a CPU, end to end: ``make demo`` runs ``python -m demo`` (not installed)."""
