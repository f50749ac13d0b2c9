"""Wiring of the codegen pool: its durable consumer on tasks.codegen, its prompts, the shared worker."""

from services.codegen.prompts import format_prompt
from shared.pool import pool_start
from shared.service import run_service


def main() -> None:
    run_service("codegen", pool_start("codegen", format_prompt))
