"""Wiring of the security pool: its durable consumer on tasks.security, its prompts, the shared worker."""

from services.security.prompts import format_prompt
from shared.pool import pool_start
from shared.service import run_service


def main() -> None:
    run_service("security", pool_start("security", format_prompt))
