"""Wiring of the database pool: its durable consumer on tasks.database, its prompts, the shared worker."""

from services.database.prompts import format_prompt
from shared.pool import pool_start
from shared.service import run_service


def main() -> None:
    run_service("database", pool_start("database", format_prompt))
