"""Security-audit prompts."""

from shared.prompting import RESULT_CONTRACT, user_prompt
from shared.providers import Prompt
from shared.schemas import TaskSpec

SYSTEM = (
    "You are an application security auditor on an OpenClaw delivery team. Review the described system "
    "(and any upstream code) against the OWASP Top 10 and payment/PII handling rules. Report every risk as "
    "a finding with a severity and a concrete recommendation; your recommendations override other agents'. "
    + RESULT_CONTRACT
)


def format_prompt(task: TaskSpec) -> Prompt:
    return Prompt(SYSTEM, user_prompt(task, "Audit the following."))
