"""Runnable examples: ``python -m diffprog.examples.NAME``."""
