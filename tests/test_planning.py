"""Plan validation, the rule-based distributor and the PM's rule-based planner."""

from __future__ import annotations

import time

import pytest

from services.pm.planning import make_plan, rules_plan
from shared.distributor import distribute, should_use_parallel_execution
from shared.errors import PlanError
from shared.execution import apply_plan, new_execution, run_command
from shared.schemas import CUT, DESCRIPTION_MAX, ExecutionRequested, TaskSpec, check_plan, now


def spec(i: str, *deps: str) -> TaskSpec:
    return TaskSpec(id=i, pool="codegen", description=i, depends_on=list(deps))


def test_check_plan_accepts_a_dag() -> None:
    check_plan([spec("a"), spec("b", "a"), spec("c", "a", "b")], 6)


@pytest.mark.parametrize(
    ("tasks", "says"),
    [
        ([spec("a", "c"), spec("b", "a"), spec("c", "b")], "dependency cycle: a -> c -> b -> a"),
        ([spec("a", "a")], "depends on itself"),
        ([spec("a", "x")], "unknown task(s): x"),
        ([spec("a"), spec("a")], "duplicate task id(s): a"),
        ([spec(str(i)) for i in range(7)], "at most 6"),
        ([], "no tasks"),
    ],
)
def test_check_plan_rejects(tasks: list[TaskSpec], says: str) -> None:
    with pytest.raises(PlanError) as err:
        check_plan(tasks, 6)
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("text", "pool"),
    [
        ("Implement a React component for the checkout page", "codegen"),
        ("Audit the login flow for CSRF and XSS vulnerabilities", "security"),
        ("Design the PostgreSQL schema and migration for orders", "database"),
        ("Check for SQL injection in the search endpoint", "security"),
    ],
)
def test_distribute_picks_the_pool(text: str, pool: str) -> None:
    d = distribute(text)
    assert d.pool == pool
    assert d.confidence > 0.5 and d.matched[pool]


def test_distribute_says_multi_when_nothing_matches() -> None:
    d = distribute("Please make it nicer")
    assert d.pool == "multi" and d.confidence == 0 and not d.confident


def test_distribute_breaks_ties_towards_security() -> None:
    # One security word and one database word of equal weight.
    d = distribute("payments orders")
    assert d.scores["security"] > 0 and d.scores["database"] > 0
    d2 = distribute("pci sql")
    assert d2.scores["security"] == d2.scores["database"] and d2.pool == "security"


def test_a_pool_at_exactly_half_the_best_weight_takes_part() -> None:
    # Security weighs 4 ("audit", "login"), codegen 2 ("fix"); with the scores rounded to 4 places, 0.3333 fell below
    # half of 0.6667 and the request went to the reviewer alone, who writes no code.
    d = distribute("Audit the login, then fix it")
    assert set(d.pools()) == {"codegen", "security"}


def test_phrases_count_once() -> None:
    d = distribute("sql injection")
    assert d.matched["security"] == ["sql injection"] and d.matched["database"] == []


def test_routing_decision_is_fast() -> None:
    text = "Build a restaurant website with online ordering, card payments and an admin page " * 5
    began = time.perf_counter()
    for _ in range(200):
        distribute(text)
    assert (time.perf_counter() - began) / 200 < 0.1  # the seed's bound is 100 ms per decision


def test_restaurant_website_plan_spans_three_pools_with_the_api_before_the_frontend() -> None:
    tasks, planner = rules_plan("Build a restaurant website with online ordering", False)
    assert planner == "rules"
    assert {t.pool for t in tasks} == {"codegen", "security", "database"}
    by_id = {t.id: t for t in tasks}
    assert by_id["frontend"].depends_on == ["backend"]
    check_plan(tasks, 6)


def test_single_pool_request_is_serial_and_nothing_matched_falls_back_to_codegen() -> None:
    tasks, planner = rules_plan("Design the PostgreSQL schema for invoices", False)
    assert planner == "serial" and [t.pool for t in tasks] == ["database"]
    tasks, planner = rules_plan("Make it nicer", False)
    assert planner == "serial" and [t.pool for t in tasks] == ["codegen"]


@pytest.mark.parametrize("message", [".", "...", " .. "])
def test_a_message_of_dots_is_planned_as_it_is(message: str) -> None:
    # A request's trailing full stop is dropped after a task's lead; a message with nothing else is kept whole.
    [task], planner = rules_plan(message, False)
    assert planner == "serial" and task.description == message.strip()
    assert TaskSpec.for_request("chat", "codegen", "", message).description == message.strip()  # chat's one task


PROJECT = ["schema", "backend", "frontend", "security-audit"]


@pytest.mark.parametrize("message", [
    "Build a restaurant website with online ordering", "build a todo app", "Create me a new e-commerce platform",
    "We want to develop our new booking site",
    # The first "make a" names no product; the later "build a new … website" does.
    "Make a list of the features first, then build a new booking website for our hotel"])
def test_a_request_to_build_something_whole_is_a_project(message: str) -> None:
    assert [t.id for t in rules_plan(message, False)[0]] == PROJECT


@pytest.mark.parametrize("message", [
    "make the login button on the site blue", "Why does the build of our app fail?", "make the app faster",
    "create a sql query that lists top customers of the shop", "Make sure the website's login is secure",
    "don't build a website, just review our database schema",
    "Don\u2019t build a website, just review our database schema", "don't  build a new app, fix the login",
    "we do not\nbuild a website"])
def test_a_change_to_something_is_not_a_whole_project(message: str) -> None:
    assert [t.id for t in rules_plan(message, False)[0]] != PROJECT


@pytest.mark.parametrize("message", [
    "fix SQL injection in the search endpoint", "fix the bug where users can't reset their password",
    "write unit tests for the payment service", "add a login page"])
def test_a_change_to_make_gets_someone_who_writes_code(message: str) -> None:
    # The security pool reviews and reports; it writes no code.
    assert "codegen" in {t.pool for t in rules_plan(message, False)[0]}


def test_one_specialist_for_a_page_to_add_is_a_coder() -> None:
    assert should_use_parallel_execution("add a login page", enabled=False).pool == "codegen"  # not a reviewer


def test_force_parallel_keeps_every_matched_pool() -> None:
    text = "Optimize the SQL queries and fix the login page"
    strict, _ = rules_plan(text, False)
    forced, planner = rules_plan(text, True)
    assert {t.pool for t in forced} == {"codegen", "security", "database"} and planner == "rules"
    assert len(strict) <= len(forced)


@pytest.mark.parametrize(("message", "pool"), [
    ("Build a shop app", "codegen"),  # a project: codegen builds it
    ("Pentest the customer portal before launch", "security"),  # the layout's only pool
    ("Optimize the slow SQL queries and indexes, and audit the login for XSS and CSRF", "security"),  # the best match
])
def test_a_layout_over_the_task_limit_becomes_one_task_for_the_whole_request(message: str, pool: str) -> None:
    # Not the first tasks of the layout: that would drop the rest of the work and still report it all done.
    req = ExecutionRequested(execution_id="e", message=message, requested_at=now(), deadline_at=now())
    full, _ = make_plan(req, 6)
    assert len(full) > 1
    for limit in range(1, len(full)):
        (task,), planner = make_plan(req, limit)
        assert planner == "serial" and task.pool == pool and task.description == message


def test_a_security_audit_of_a_whole_system_becomes_independent_reviews_and_a_narrow_one_stays_one_task() -> None:
    tasks, planner = rules_plan("Pentest the customer portal before launch", False)
    assert planner == "rules" and len(tasks) == 4
    assert {t.pool for t in tasks} == {"security"} and not any(t.depends_on for t in tasks)
    assert all(t.description.endswith("of: Pentest the customer portal before launch") for t in tasks)
    tasks, planner = rules_plan("Audit the login flow for CSRF and XSS vulnerabilities", False)
    assert planner == "serial" and [t.pool for t in tasks] == ["security"]
    tasks, _ = rules_plan("Audit the shop's database schema and its backups", False)  # not security alone
    assert {t.pool for t in tasks} != {"security"}


def test_a_client_plan_is_revalidated() -> None:
    req = ExecutionRequested(execution_id="e", message="m", tasks=[spec("a", "b"), spec("b", "a")],
                             requested_at=now(), deadline_at=now())
    with pytest.raises(PlanError, match="cycle"):
        make_plan(req, 6)


@pytest.mark.parametrize("text", [
    "Audit our web shop for security problems before launch",  # "web" is a passing mention of codegen
    "Audit the login flow for CSRF and XSS vulnerabilities",
    "Design the database schema and audit its access control",
    "Optimize the SQL queries and fix the login page",
    "Design the PostgreSQL schema for invoices",
    "Make it nicer",
    "Build a restaurant website with online ordering",
])
@pytest.mark.parametrize("project", [None, "security audit of the payments app"])
@pytest.mark.parametrize("force", [False, True])
def test_chat_goes_parallel_exactly_when_the_rules_plan_more_than_one_task(text: str, project: str | None,
                                                                           force: bool) -> None:
    routing = should_use_parallel_execution(text, enabled=True, project=project, force_parallel=force)
    tasks, _ = rules_plan(text, force, project)
    assert routing.parallel == (force or len(tasks) > 1), (routing.reason, [t.pool for t in tasks])
    assert set(routing.pools) == {t.pool for t in tasks}  # the pools the work goes to, either way


@pytest.mark.parametrize("word", ["build ", "audit security "])
def test_routing_and_planning_a_message_as_long_as_the_api_allows_take_linear_time(word: str) -> None:
    # A verb everywhere and the noun nowhere: a single pattern with ".*" between them backtracked for about a
    # minute on this (the square of the length), holding the gateway's or the PM's event loop; two scans take ms.
    text = (word * 20_000)[:100_000]
    began = time.perf_counter()
    assert not should_use_parallel_execution(text, enabled=True).parallel
    (task,), _ = rules_plan(text, False)
    assert time.perf_counter() - began < 2
    # Longer than a description may be: cut there, and whole in the context of the task's message (the
    # execution stores it once, not once per task).
    assert len(task.description) == DESCRIPTION_MAX and task.description.endswith(CUT)
    assert "request" not in task.context
    req = ExecutionRequested(execution_id="e", message=text, requested_at=now(), deadline_at=now())
    ex = new_execution(req)
    apply_plan(ex, [task], "serial")
    assert run_command(ex, ex.tasks[0]).task.context["request"] == text.strip()


@pytest.mark.parametrize(("text", "parallel", "pools", "reason"), [
    ("Build a restaurant website with online ordering", True, ["database", "codegen", "security"], "a project"),
    ("Make it nicer", False, ["codegen"], "no specialist stands out: codegen takes it"),
])
def test_chat_routing_names_the_pools_the_work_goes_to(text: str, parallel: bool, pools: list[str],
                                                       reason: str) -> None:
    routing = should_use_parallel_execution(text, enabled=True)
    assert routing.parallel is parallel and routing.reason.startswith(reason)
    assert routing.pools == pools
    assert sorted({t.pool for t in make_plan(ExecutionRequested(execution_id="e", message=text, requested_at=now(),
                                                                deadline_at=now()), 6)[0]}) == sorted(pools)
