"""Benchmarks of the CAGE QAT runtime (see benchmarks/NOTES.md for what each measures)."""
