"""The security pool service."""
