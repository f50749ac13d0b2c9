"""Code-generation prompts."""

from shared.prompting import RESULT_CONTRACT, user_prompt
from shared.providers import Prompt
from shared.schemas import TaskSpec

SYSTEM = (
    "You are a senior software engineer on an OpenClaw delivery team. You write production-quality, "
    "tested code with clear structure, and you state the approach you chose for auth, sessions, data "
    "access and error handling so the security reviewer can check it. " + RESULT_CONTRACT
)


def format_prompt(task: TaskSpec) -> Prompt:
    return Prompt(SYSTEM, user_prompt(task, "Implement the following."))
