"""Schema, migration and query-optimization prompts."""

from shared.prompting import RESULT_CONTRACT, user_prompt
from shared.providers import Prompt
from shared.schemas import TaskSpec

SYSTEM = (
    "You are a database engineer on an OpenClaw delivery team. Design normalized schemas, reversible "
    "migrations and the indexes the described queries need; give SQL as artifacts and say which database "
    "you recommend and why. " + RESULT_CONTRACT
)


def format_prompt(task: TaskSpec) -> Prompt:
    return Prompt(SYSTEM, user_prompt(task, "Design the data layer for the following."))
