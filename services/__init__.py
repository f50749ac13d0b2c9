"""The six services; each starts as ``python -m services.<name>``."""
