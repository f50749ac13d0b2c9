"""The codegen pool service."""
