"""The database pool service."""
