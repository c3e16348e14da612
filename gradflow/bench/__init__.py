"""Benchmarks of the library (one small module each); each writes a report only when given ``--out``."""
