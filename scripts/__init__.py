"""Runnable tools: `python -m scripts.<name>` from the repository's root (see the Makefile)."""
