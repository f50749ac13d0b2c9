"""Conflict detection and resolution on execution documents (pure functions, no broker needed)."""

from __future__ import annotations

import json
from datetime import timedelta

from services.aggregator.aggregate import aggregate
from services.aggregator.conflicts import settle, topic_key
from services.aggregator.prompts import format_prompt
from services.aggregator.synthesis import alone, specialist_answer
from shared.config import PMCoordinator
from shared.execution import apply_plan, new_execution, run_command
from shared.schemas import (
    Artifact,
    Execution,
    ExecutionRequested,
    Finding,
    Recommendation,
    TaskOutput,
    TaskSpec,
    now,
)


def execution(outputs: dict[str, tuple[str, TaskOutput | None]]) -> Execution:
    t0 = now()
    ex = new_execution(ExecutionRequested(execution_id="e", message="m", requested_at=t0,
                                          deadline_at=t0 + timedelta(hours=1)))
    apply_plan(ex, [TaskSpec(id=i, pool=pool, description=i) for i, (pool, _) in outputs.items()], "client")
    for t in ex.tasks:
        out = outputs[t.id][1]
        t.status, t.output = ("completed", out) if out is not None else ("failed", None)
    return ex


def rec(topic: str, choice: str) -> Recommendation:
    return Recommendation(topic=topic, choice=choice, rationale=f"because {choice}")


CSRF_FIX = "Require CSRF tokens on every state-changing request"


def test_seed_csrf_example_is_resolved_security_first_with_an_audit_entry() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "SameSite=Lax cookies only")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="Cross-Site Request Forgery", detail="forms accept cross-site posts",
                    recommendation=CSRF_FIX)])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.kind, c.rule, c.topic) == ("approach_vs_risk", "security_first", "CSRF")
    assert CSRF_FIX in c.resolution
    [o] = s.audit
    assert (o.rule, o.overridden.pool, o.overridden.says, o.by.pool, o.by.says) == (
        "security_first", "codegen", "SameSite=Lax cookies only", "security", CSRF_FIX)
    assert [(r.topic, r.choice, r.sources) for r in s.recommendations] == [("CSRF", CSRF_FIX, ["audit"])]
    assert s.decisions == []

    # The synthesis model is told about the conflict as JSON, like every other fact.
    prompt = format_prompt(ex, aggregate(ex, "security_first"), "completed", PMCoordinator())
    facts = json.loads(prompt.user.split("\n\n", 1)[1])
    [told] = facts["conflicts"]
    assert (told["kind"], told["topic"], told["rule"]) == ("approach_vs_risk", "CSRF", "security_first")
    assert {p["pool"] for p in told["positions"]} == {"codegen", "security"}


def test_security_choice_beats_another_tool_and_agreement_is_merged() -> None:
    ex = execution({
        "api": ("codegen", TaskOutput(summary="a", recommendations=[rec("sessions", "JWT in localStorage"),
                                                                     rec("database", "PostgreSQL")])),
        "db": ("database", TaskOutput(summary="d", recommendations=[rec("DB", "postgresql")])),
        "sec": ("security", TaskOutput(summary="s", recommendations=[rec("session management",
                                                                         "server-side sessions")])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.kind, c.rule, c.topic) == ("different_tools", "security_first", "sessions")
    assert [(o.overridden.says, o.by.says) for o in s.audit] == [("JWT in localStorage", "server-side sessions")]
    merged = next(r for r in s.recommendations if topic_key(r.topic) == "database")
    assert merged.sources == ["api", "db"] and merged.choice == "PostgreSQL"  # rule 2: agreement merged
    assert "because PostgreSQL" in merged.rationale and "because postgresql" in merged.rationale


def test_a_disagreement_without_security_is_flagged_as_a_decision() -> None:
    ex = execution({
        "api": ("codegen", TaskOutput(summary="a", recommendations=[rec("database", "MongoDB")])),
        "db": ("database", TaskOutput(summary="d", recommendations=[rec("database", "PostgreSQL")])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.kind, c.rule) == ("different_tools", "flag")
    assert s.audit == []  # nothing was overridden
    assert s.decisions == ["database: MongoDB (codegen) or PostgreSQL (database)?"]
    assert all(r.decision_needed for r in s.recommendations) and len(s.recommendations) == 2


def test_contradictory_findings_keep_securitys_assessment() -> None:
    ex = execution({
        "db": ("database", TaskOutput(summary="d", findings=[Finding(severity="info", topic="sql injection",
                                                                      detail="ORM parameterises queries")])),
        "sec": ("security", TaskOutput(summary="s", findings=[Finding(severity="critical", topic="SQL injection",
                                                                       detail="raw query in search",
                                                                       recommendation="parameterise it")])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.kind, c.rule) == ("contradictory_findings", "security_first")
    assert [f.severity for f in s.findings] == ["critical"]
    [o] = s.audit
    assert (o.overridden.pool, o.overridden.severity, o.by.severity) == ("database", "info", "critical")


def test_another_agents_finding_never_replaces_securitys_on_the_same_risk() -> None:
    def both(other: Finding) -> Execution:
        return execution({
            "backend": ("codegen", TaskOutput(summary="api", findings=[other])),
            "audit": ("security", TaskOutput(summary="audit", findings=[
                Finding(severity="high", topic="CSRF", detail="forms accept cross-site posts",
                        recommendation=CSRF_FIX)])),
        })

    # The same severity (plan order would have kept codegen's), then a more severe one: security's stands.
    for severity in ("high", "critical"):
        ex = both(Finding(severity=severity, topic="csrf", detail="x",
                          recommendation="SameSite=Lax cookies are enough; no CSRF tokens"))
        s = settle(ex)
        assert [(f.severity, f.recommendation) for f in s.findings] == [("high", CSRF_FIX)]
        [c] = s.conflicts
        assert (c.kind, c.rule) == ("contradictory_findings", "security_first") and CSRF_FIX in c.resolution
        [o] = s.audit
        assert (o.overridden.pool, o.by.pool, o.by.says) == ("codegen", "security", CSRF_FIX)
        assert CSRF_FIX in aggregate(ex, "security_first").model_dump_json()
        assert "no CSRF tokens" not in json.dumps([f.model_dump() for f in aggregate(ex, "security_first").findings])

    # Agreement is no conflict, and security's wording is the one kept.
    s = settle(both(Finding(severity="medium", topic="csrf", detail="x", recommendation=CSRF_FIX.lower() + ".")))
    assert s.conflicts == [] and s.audit == [] and [f.severity for f in s.findings] == ["high"]


def test_flag_all_lists_every_option_as_a_decision_and_settles_none() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("csrf", "SameSite=Lax cookies only")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="csrf", detail="forms accept cross-site posts", recommendation=CSRF_FIX)])),
    })
    s = settle(ex, "flag_all")
    assert sorted((r.choice, r.decision_needed) for r in s.recommendations) == [
        (CSRF_FIX, True), ("SameSite=Lax cookies only", True)]


def test_flag_all_mode_overrides_nothing() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("csrf", "none")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="csrf", recommendation=CSRF_FIX)])),
    })
    s = settle(ex, "flag_all")
    assert [c.rule for c in s.conflicts] == ["flag"] and s.audit == []
    assert s.decisions == [f"csrf: {CSRF_FIX} (security) or none (codegen)?"]


def test_aggregated_result_of_a_partial_execution() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api done", recommendations=[rec("csrf", "none")])),
        "audit": ("security", None),
        "schema": ("database", TaskOutput(summary="schema done")),
    })
    ex.task("audit").degradation = "unaudited"  # type: ignore[union-attr]
    agg = aggregate(ex)
    assert set(agg.outputs) == {"codegen", "database"}
    assert agg.conflicts_detected == []  # no security output, nothing to resolve against
    assert agg.quality_score == round(2 / 3 * 0.9, 3)
    assert agg.summary.startswith("2 of 3 task(s) completed across 2 pool(s)")


def test_released_task_carries_its_dependencies_outputs() -> None:
    t0 = now()
    ex = new_execution(ExecutionRequested(execution_id="e", message="m", requested_at=t0, deadline_at=t0))
    apply_plan(ex, [TaskSpec(id="schema", pool="database", description="s"),
                    TaskSpec(id="api", pool="codegen", description="a", depends_on=["schema"],
                             context={"stack": "fastapi"})], "client")
    ex.task("schema").output = TaskOutput(summary="tables: orders")  # type: ignore[union-attr]
    cmd = run_command(ex, ex.task("api"))  # type: ignore[arg-type]
    assert cmd.task.context == {"stack": "fastapi", "upstream": {"schema": {"summary": "tables: orders"}}}


def answer(ex: Execution, mode: str = "security_first") -> str:
    """The template's answer (what the simulated provider, or a failed synthesis call, gives the client)."""
    from services.aggregator.synthesis import synthesize
    from shared.execution import outcome

    return synthesize(ex, aggregate(ex, mode), outcome(ex), PMCoordinator(emoji=False))


def test_every_security_finding_stands_whatever_its_script_or_spelling() -> None:
    ex = execution({"audit": ("security", TaskOutput(summary="audit", findings=[
        Finding(severity="critical", topic="Инъекция", recommendation="Параметризуйте запросы"),
        Finding(severity="high", topic="Межсайтовый скриптинг", recommendation="Экранируйте вывод"),
        Finding(severity="high", topic="XSS", recommendation="Escape output in search"),
        Finding(severity="low", topic="xss", recommendation="Add a Content-Security-Policy header"),
        Finding(severity="low", topic="X.S.S.", recommendation="add a content-security-policy header")]))})
    s = settle(ex)
    assert [(f.topic, f.severity) for f in s.findings] == [
        ("Инъекция", "critical"), ("Межсайтовый скриптинг", "high"), ("XSS", "high"), ("xss", "low")]
    assert s.conflicts == [] and s.audit == []  # security does not overrule itself
    text = answer(ex)
    assert "Экранируйте вывод" in text and "Content-Security-Policy" in text and "(over )" not in text


def test_security_first_applies_the_advice_of_securitys_most_severe_finding() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "SameSite=Lax only")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="low", topic="CSRF", recommendation="Consider SameSite=Strict"),
            Finding(severity="critical", topic="CSRF", recommendation=CSRF_FIX)])),
    })
    s = settle(ex)
    assert [r.choice for r in s.recommendations] == [CSRF_FIX]
    assert [o.by.says for o in s.audit] == [CSRF_FIX]


def test_advice_is_compared_in_any_script_and_the_symbols_that_name_things_count() -> None:
    opposite = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "不需要 CSRF 令牌")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation="必须使用 CSRF 令牌")])),
    })
    assert [c.kind for c in settle(opposite).conflicts] == ["approach_vs_risk"]
    languages = execution({
        "api": ("codegen", TaskOutput(summary="api", recommendations=[rec("language", "C#")])),
        "db": ("database", TaskOutput(summary="db", recommendations=[rec("language", "C++")])),
    })
    assert settle(languages).decisions == ["language: C# (codegen) or C++ (database)?"]
    assert topic_key("Сессии") != topic_key("Платежи")


def test_two_security_tasks_that_disagree_leave_the_choice_to_the_client() -> None:
    ex = execution({
        "review_a": ("security", TaskOutput(summary="a", recommendations=[rec("sessions", "server-side sessions")])),
        "review_b": ("security", TaskOutput(summary="b", recommendations=[rec("sessions", "JWT in a cookie")])),
        "api": ("codegen", TaskOutput(summary="api", recommendations=[rec("sessions", "server-side sessions")])),
    })
    s = settle(ex)
    assert s.audit == [] and [c.rule for c in s.conflicts] == ["flag"]
    assert s.decisions == ["sessions: server-side sessions (security, codegen) or JWT in a cookie (security)?"]


def test_each_option_is_listed_once_with_everyone_who_gave_it() -> None:
    agree = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "SameSite=Lax only")])),
        "schema": ("database", TaskOutput(summary="db", recommendations=[rec("CSRF", CSRF_FIX)])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)])),
    })
    [settled] = settle(agree).recommendations
    assert (settled.choice, settled.sources, settled.decision_needed) == (CSRF_FIX, ["audit", "schema"], False)
    three = execution({
        "api": ("codegen", TaskOutput(summary="a", recommendations=[rec("database", "PostgreSQL")])),
        "db": ("database", TaskOutput(summary="d", recommendations=[rec("database", "postgresql")])),
        "web": ("codegen", TaskOutput(summary="w", recommendations=[rec("database", "MongoDB")])),
    })
    s = settle(three)
    assert s.decisions == ["database: PostgreSQL (codegen, database) or MongoDB (codegen)?"]
    assert [(r.choice, r.sources) for r in s.recommendations] == [("PostgreSQL", ["api", "db"]),
                                                                  ("MongoDB", ["web"])]


def test_flag_all_names_every_option_settles_none_and_keeps_securitys_side_of_a_tie() -> None:
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "SameSite=Lax only")])),
        "schema": ("database", TaskOutput(summary="db", recommendations=[rec("CSRF", "nothing needed")])),
        "seed": ("database", TaskOutput(summary="seed", recommendations=[rec("CSRF", CSRF_FIX)])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)])),
    })
    s = settle(ex, "flag_all")
    assert s.decisions == [f"CSRF: {CSRF_FIX} (security, database) or SameSite=Lax only (codegen) or nothing needed "
                           "(database)?"]
    assert [(r.choice, r.decision_needed) for r in s.recommendations] == [
        (CSRF_FIX, True), ("SameSite=Lax only", True), ("nothing needed", True)]
    tie = execution({
        "backend": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="CSRF", recommendation="SameSite is enough; skip CSRF tokens")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)])),
    })
    s = settle(tie, "flag_all")
    assert [f.recommendation for f in s.findings] == [CSRF_FIX] and len(s.decisions) == 1
    assert "the advice differs" in s.conflicts[0].resolution
    assert "skip CSRF tokens" not in answer(tie, "flag_all").split("Next steps:")[1]


def test_the_answer_names_every_finding_and_recommendation_and_counts_what_is_done() -> None:
    ex = execution({
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="critical", topic="Hardcoded AWS key", detail="config.py holds a live secret")],
            recommendations=[rec("password hashing", "argon2id")])),
        **{f"t{i}": ("database", None) for i in range(4)},
    })
    text = answer(ex)
    assert "Address [critical] Hardcoded AWS key: config.py holds a live secret" in text
    assert "  • password hashing: argon2id" in text.split("Recommendations:")[1]
    assert "1 of 5 pieces are done; the rest needs another pass." in text


def test_a_model_writing_the_answer_is_told_what_the_template_says() -> None:
    from shared.execution import _give_up

    ex = execution({
        "api": ("codegen", None),
        "web": ("codegen", TaskOutput(summary="w", recommendations=[rec("database", "MongoDB")])),
        "db": ("database", TaskOutput(summary="d", recommendations=[rec("database", "PostgreSQL")])),
        "sec": ("security", None),
    })
    for tid in ("api", "sec"):
        _give_up(ex.task(tid), "timed out")  # type: ignore[arg-type]
    facts = json.loads(format_prompt(ex, aggregate(ex), "partial", PMCoordinator()).user.split("\n\n", 1)[1])
    assert {t["id"]: t.get("degradation") for t in facts["tasks"]} == {
        "api": "pending", "web": None, "db": None, "sec": "unaudited"}
    assert facts["decisions_for_the_client"] == [
        "api (codegen) is pending: retry it, give it more time, or drop it from scope?",
        "database: MongoDB (codegen) or PostgreSQL (database)?"]


def test_a_cancelled_security_review_leaves_the_results_unaudited() -> None:
    from shared.execution import cancel

    ex = execution({"api": ("codegen", TaskOutput(summary="api done")), "sec": ("security", None)})
    ex.task("sec").status = "running"  # type: ignore[union-attr]
    cancel(ex, "cancelled by the client")
    assert ex.task("sec").degradation == "unaudited"  # type: ignore[union-attr]
    assert aggregate(ex).quality_score == round(1 / 2 * 0.9, 3)
    assert "treat these results as unaudited" in answer(ex)


def split_reviews(other: str, api: TaskOutput) -> Execution:
    """Two security reviews rating CSRF high, one advising CSRF_FIX and one ``other``, beside codegen's ``api``."""
    return execution({
        "sec_a": ("security", TaskOutput(summary="a", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)])),
        "sec_b": ("security", TaskOutput(summary="b", findings=[
            Finding(severity="high", topic="CSRF", recommendation=other)])),
        "api": ("codegen", api),
    })


def test_two_security_reviews_advising_differently_on_a_risk_leave_the_choice_to_the_client() -> None:
    ex = split_reviews("SameSite=Strict cookies", TaskOutput(
        summary="api", recommendations=[rec("CSRF", "SameSite=Strict cookies")],
        findings=[Finding(severity="high", topic="CSRF", recommendation="SameSite=Strict cookies")]))
    s = settle(ex)
    assert s.audit == [] and {c.rule for c in s.conflicts} == {"flag"}  # neither review overrules the other
    assert s.decisions == [f"CSRF: {CSRF_FIX} (security) or SameSite=Strict cookies (security, codegen)?"]
    assert [(r.choice, r.sources, r.decision_needed) for r in s.recommendations] == [
        (CSRF_FIX, ["sec_a"], True), ("SameSite=Strict cookies", ["sec_b", "api"], True)]
    assert sorted(f.recommendation for f in s.findings) == [CSRF_FIX, "SameSite=Strict cookies"]


def test_findings_that_differ_only_in_what_they_found_are_two_findings() -> None:
    ex = execution({"audit": ("security", TaskOutput(summary="audit", findings=[
        Finding(severity="high", topic="SQL injection", detail="/login concatenates the e-mail",
                recommendation="Use bound parameters"),
        Finding(severity="high", topic="SQL injection", detail="/search concatenates the query",
                recommendation="Use bound parameters")]))})
    assert [f.detail for f in settle(ex).findings] == ["/login concatenates the e-mail",
                                                       "/search concatenates the query"]


def test_topics_keep_their_vowel_signs_and_match_in_either_unicode_form() -> None:
    assert topic_key("रोल") != topic_key("रूल") and topic_key("पोर्ट") != topic_key("पार्ट")
    assert topic_key("sécurité") == topic_key("se\u0301curite\u0301") != topic_key("securite")


def test_security_reviews_split_on_a_risk_with_no_recommendation_are_still_a_decision() -> None:
    ex = split_reviews("SameSite=Strict", TaskOutput(
        summary="api", findings=[Finding(severity="low", topic="CSRF", recommendation="SameSite=Strict")]))
    s = settle(ex)
    assert s.audit == [] and [c.rule for c in s.conflicts] == ["flag"]  # not settled by plan order
    assert s.decisions == [f"CSRF: agents disagree (security high: {CSRF_FIX}; security high: SameSite=Strict; "
                           "codegen low: SameSite=Strict)"]


def test_flag_all_keeps_securitys_own_other_advice_on_the_topic() -> None:
    ex = execution({
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)],
            recommendations=[rec("CSRF", "Use double-submit cookies")])),
        "api": ("codegen", TaskOutput(summary="api", recommendations=[rec("CSRF", "SameSite=Lax only")])),
    })
    for mode in ("flag_all", "security_first"):
        assert "Use double-submit cookies" in [r.choice for r in settle(ex, mode).recommendations], mode


def test_flag_all_settles_none_of_a_flagged_topics_advice_also_where_security_and_others_agree() -> None:
    # The findings' advice differs, so the topic is flagged; security's recommendation, which says what its own
    # finding says, was listed as settled beside that decision.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="CSRF", recommendation="SameSite=Lax cookies are enough")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", recommendation=CSRF_FIX)], recommendations=[rec("CSRF", CSRF_FIX)])),
    })
    flagged = settle(ex, "flag_all")
    assert len(flagged.decisions) == 1 and flagged.recommendations
    assert all(r.decision_needed for r in flagged.recommendations), flagged.recommendations
    assert [(r.choice, r.decision_needed) for r in settle(ex, "security_first").recommendations] == [(CSRF_FIX, False)]


def test_a_topic_that_names_one_known_risk_is_that_risk_however_it_is_spelt() -> None:
    # Models name a topic as they please: security's "Cross-site request forgery (CSRF)" and codegen's "csrf" were two
    # topics, so codegen's approach stood as settled beside the finding that contradicted it.
    assert {topic_key(t) for t in ("csrf", "CSRF tokens", "Cross-site request forgery (CSRF)", "XSRF protection",
                                   "Cross-Site Request Forgery", "Anti-CSRF tokens", "CSRF defences",
                                   "CrossSiteRequestForgery")} == {"csrf"}
    assert topic_key("Insecure Direct Object Reference (IDOR)") == "idor"
    assert {topic_key(t) for t in ("XSS protection", "Cross-site scripting", "xss")} == {"xss"}
    assert {topic_key(t) for t in ("SQL/injection", "SQLi", "sql-injection")} == {"sqlinjection"}
    # A topic that says more than a risk's name is a topic of its own: two places, an approach that mentions a risk,
    # two subjects.
    assert topic_key("SQL injection in login") != topic_key("SQL injection in the report export")
    for topic in ("XSS in the search form", "ORM (prevents SQL injection)", "CSRF and XSS", "CSRF and CORS"):
        assert topic_key(topic) not in ("csrf", "xss", "sqlinjection"), topic
    assert topic_key("database encryption") != topic_key("database")
    ex = execution({
        "backend": ("codegen", TaskOutput(summary="api", recommendations=[
            rec("csrf", "SameSite=Lax cookies only, no CSRF tokens")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="Cross-site request forgery (CSRF)", detail="forms accept cross-site posts",
                    recommendation=CSRF_FIX)])),
    })
    s = settle(ex)
    assert [(c.kind, c.rule) for c in s.conflicts] == [("approach_vs_risk", "security_first")]
    assert [(r.choice, r.decision_needed) for r in s.recommendations] == [(CSRF_FIX, False)]
    places = settle(execution({  # two places with the same risk: two findings, no conflict between them
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="XSS in the search form", recommendation="Escape the output")])),
        "ui": ("codegen", TaskOutput(summary="ui", findings=[
            Finding(severity="low", topic="XSS in the admin preview")])),
    }))
    assert places.conflicts == [] and sorted(f.severity for f in places.findings) == ["high", "low"]


def test_an_approach_to_a_risk_security_names_no_fix_for_waits_for_the_client() -> None:
    # Security found a high risk and named no fix: codegen's approach to that topic stood as settled, as if nothing
    # had been found. It is now a decision: does it address the risk? A low finding keeps nothing from standing.
    def with_finding(severity: str) -> Execution:
        return execution({
            "backend": ("codegen", TaskOutput(summary="api", recommendations=[rec("csrf", "SameSite=Lax cookies")])),
            "audit": ("security", TaskOutput(summary="audit", findings=[
                Finding(severity=severity, topic="CSRF", detail="forms accept cross-site posts")])),  # type: ignore[arg-type]
        })

    s = settle(with_finding("high"))
    [c] = s.conflicts
    assert (c.kind, c.rule, c.topic) == ("approach_vs_risk", "security_first", "csrf")
    assert c.resolution.startswith("security's finding stands (high risk: forms accept cross-site posts)")
    assert s.audit == []  # nothing replaced the approach: it waits for the client
    assert [(r.choice, r.decision_needed) for r in s.recommendations] == [("SameSite=Lax cookies", True)]
    assert s.decisions == ["csrf: security reports a high risk: forms accept cross-site posts; does SameSite=Lax "
                           "cookies (codegen) address it?"]
    assert [f.severity for f in s.findings] == ["high"]  # the finding itself stands

    flagged = settle(with_finding("high"), "flag_all")
    assert [c.rule for c in flagged.conflicts] == ["flag"]

    advised = with_finding("high")  # security names its choice among its recommendations: that choice applies
    advised.tasks[1].output.recommendations.append(rec("csrf", "Synchronizer tokens"))  # type: ignore[union-attr]
    s = settle(advised)
    assert [(c.kind, c.rule) for c in s.conflicts] == [("different_tools", "security_first")]
    assert [(r.choice, r.decision_needed) for r in s.recommendations] == [("Synchronizer tokens", False)]

    low = settle(with_finding("low"))
    assert low.conflicts == [] and low.decisions == []
    assert [(r.choice, r.decision_needed) for r in low.recommendations] == [("SameSite=Lax cookies", False)]


def test_a_specialist_answering_alone_says_what_it_did_and_what_is_left_to_decide() -> None:
    ex = execution({"chat": ("database", TaskOutput(
        summary="Invoices schema",
        artifacts=[Artifact(path="db/001.sql", kind="sql", content="CREATE TABLE invoices ();")],
        findings=[Finding(severity="medium", topic="pii", detail="emails in clear", recommendation="encrypt them")],
        recommendations=[rec("database", "PostgreSQL"), rec("database", "MySQL")]))})
    ex.routing = {"parallel": False, "reason": "one specialist suffices: database", "pools": ["database"]}
    assert alone(ex)
    answer = specialist_answer(ex, aggregate(ex, "security_first"))
    assert answer.split("\n")[:4] == ["Invoices schema", "", "db/001.sql (sql):", "CREATE TABLE invoices ();"]
    assert "  • [medium] pii: emails in clear — encrypt them" in answer
    # One agent that gave two choices for a topic leaves the choice to the client, as the PM's answer would.
    assert "Decisions for you:\n  • database: PostgreSQL (database) or MySQL (database)?" in answer
    assert answer.endswith("Cost: $0.0000 — agents $0.0000 (database $0.0000).")
    ex.routing = {"parallel": True, "reason": "force_parallel", "pools": ["database"]}
    assert not alone(ex)  # a plan of one task the client asked to run in parallel is the PM's to answer


def test_a_finding_advising_other_than_the_approach_security_recommends_is_settled_security_first() -> None:
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="session-handling", detail="tokens readable by scripts",
                    recommendation="JWT in an httpOnly cookie")])),
        "audit": ("security", TaskOutput(summary="audit", recommendations=[rec("session handling",
                                                                               "server-side sessions")])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.kind, c.rule) == ("approach_vs_risk", "security_first") and "server-side sessions" in c.resolution
    [o] = s.audit
    assert (o.overridden.pool, o.overridden.says, o.by.pool, o.by.says) == (
        "codegen", "JWT in an httpOnly cookie", "security", "server-side sessions")
    # The risk codegen found stands, with security's approach for its fix; the client is not told to do both.
    assert [(f.detail, f.recommendation) for f in s.findings] == [("tokens readable by scripts",
                                                                   "server-side sessions")]
    assert [r.choice for r in s.recommendations] == ["server-side sessions"]
    steps = answer(ex).split("Next steps:")[1]
    assert "server-side sessions" in steps and "JWT" not in steps  # named only as what security overruled

    flagged = settle(ex, "flag_all")
    assert [c.rule for c in flagged.conflicts] == ["flag"] and flagged.audit == []
    assert flagged.decisions == ["session-handling: server-side sessions (security) or JWT in an httpOnly cookie "
                                 "(codegen)?"]


def test_every_distinct_finding_of_other_agents_stands_where_security_says_nothing_about_it() -> None:
    sqli = [Finding(severity="high", topic="SQL injection", detail=f"{path} concatenates input",
                    recommendation="Use bound parameters") for path in ("/login", "/search")]
    # No security review (it failed: the results are unaudited): both holes stand, not only the first.
    ex = execution({"api": ("codegen", TaskOutput(summary="api", findings=sqli)), "audit": ("security", None)})
    assert [f.detail for f in settle(ex).findings] == ["/login concatenates input", "/search concatenates input"]

    # Security found XSS elsewhere and named no fix: codegen's finding, and the only fix anyone named, stand too.
    ex = execution({
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="XSS", detail="search echoes input")])),
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="xss", detail="admin preview renders raw HTML",
                    recommendation="Escape all template output")])),
    })
    s = settle(ex)
    assert s.conflicts == [] and [(f.detail, f.recommendation) for f in s.findings] == [
        ("search echoes input", ""), ("admin preview renders raw HTML", "Escape all template output")]
    assert "Escape all template output" in answer(ex)


def test_two_security_reviews_advising_differently_are_a_decision_with_no_other_agent_on_the_risk() -> None:
    ex = execution({
        "auth_review": ("security", TaskOutput(summary="a", findings=[
            Finding(severity="high", topic="CSRF", detail="forms", recommendation=CSRF_FIX)])),
        "input_review": ("security", TaskOutput(summary="b", findings=[
            Finding(severity="high", topic="csrf", detail="forms", recommendation="SameSite=Strict cookies only")])),
    })
    s = settle(ex)
    assert s.audit == [] and [c.rule for c in s.conflicts] == ["flag"]
    assert s.decisions == [f"CSRF: agents disagree (security high: {CSRF_FIX}; security high: SameSite=Strict cookies "
                           "only)"]


def test_securitys_advice_counts_where_its_most_severe_finding_names_no_fix() -> None:
    jwt = Finding(severity="high", topic="session handling", detail="tokens readable by scripts",
                  recommendation="JWT in an httpOnly cookie")
    # Its approach, as a recommendation beside a finding that names no fix.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[jwt])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="session handling", detail="sessions never expire")],
            recommendations=[rec("session handling", "server-side sessions")])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert (c.rule, "server-side sessions" in c.resolution) == ("security_first", True)
    assert "JWT in an httpOnly cookie" not in [f.recommendation for f in s.findings]
    assert [r.choice for r in s.recommendations] == ["server-side sessions"]
    # Its fix, on a less severe finding (the seed's CSRF clash).
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="CSRF", detail="x", recommendation="SameSite=Lax cookies only")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            Finding(severity="high", topic="CSRF", detail="forms accept cross-site posts"),
            Finding(severity="medium", topic="CSRF", detail="the API too", recommendation=CSRF_FIX)])),
    })
    s = settle(ex)
    [c] = s.conflicts
    assert c.rule == "security_first" and CSRF_FIX in c.resolution
    assert "SameSite=Lax cookies only" not in [f.recommendation for f in s.findings]


def test_fixes_that_differ_without_security_are_a_decision() -> None:
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="password storage", detail="plain SHA-256", recommendation="bcrypt")])),
        "db": ("database", TaskOutput(summary="db", findings=[
            Finding(severity="high", topic="password storage", detail="unsalted", recommendation="argon2id")])),
        "audit": ("security", None),
    })
    s = settle(ex)
    assert [c.rule for c in s.conflicts] == ["flag"] and len(s.decisions) == 1
    assert "bcrypt" in s.decisions[0] and "argon2id" in s.decisions[0]


def test_flag_all_names_a_findings_fix_and_every_approach_in_one_decision_settling_none() -> None:
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="sessions", detail="tokens readable by scripts",
                    recommendation="JWT in an httpOnly cookie")],
            recommendations=[rec("sessions", "JWT in localStorage")])),
        "audit": ("security", TaskOutput(summary="audit", recommendations=[rec("sessions", "server-side sessions")])),
    })
    s = settle(ex, "flag_all")
    assert len(s.decisions) == 1 and s.audit == []
    for choice in ("JWT in localStorage", "server-side sessions", "JWT in an httpOnly cookie"):
        assert choice in s.decisions[0]
    assert all(r.decision_needed for r in s.recommendations)


def test_one_decision_per_topic_and_no_override_of_what_security_itself_advises() -> None:
    def sessions(fix: str) -> Finding:
        return Finding(severity="high", topic="session handling", detail="tokens readable by scripts",
                       recommendation=fix)

    no_fix = Finding(severity="high", topic="session handling", detail="sessions never expire")
    # Codegen's fix is security's own recommendation, beside a lesser finding's other fix: nothing is overruled.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[sessions("server-side sessions")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[
            no_fix, Finding(severity="low", topic="session handling", detail="idle", recommendation="15-minute idle "
                                                                                                   "timeout")],
            recommendations=[rec("session handling", "server-side sessions")])),
    })
    s = settle(ex)
    assert s.conflicts == [] and s.audit == []

    # Security's approaches differ: a finding's fix is one more option of the one decision, overruling nothing.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[sessions("JWT in an httpOnly cookie")])),
        "audit1": ("security", TaskOutput(summary="a1", findings=[no_fix],
                                          recommendations=[rec("session handling", "server-side sessions")])),
        "audit2": ("security", TaskOutput(summary="a2", recommendations=[
            rec("session handling", "short-lived JWT + refresh rotation")])),
    })
    s = settle(ex)
    assert s.audit == [] and len(s.decisions) == 1
    for choice in ("server-side sessions", "short-lived JWT + refresh rotation", "JWT in an httpOnly cookie"):
        assert choice in s.decisions[0]
    assert "tokens readable by scripts" in [f.detail for f in s.findings]

    # flag_all: one decision, and the finding stands.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[sessions("JWT in an httpOnly cookie")],
                                      recommendations=[rec("session handling", "JWT in an httpOnly cookie")])),
        "audit": ("security", TaskOutput(summary="audit", findings=[no_fix],
                                         recommendations=[rec("session handling", "server-side sessions")])),
    })
    s = settle(ex, "flag_all")
    assert len(s.decisions) == 1 and s.audit == [] and all(r.decision_needed for r in s.recommendations)
    assert "tokens readable by scripts" in [f.detail for f in s.findings]

    # No security: differing fixes and a recommendation of one of them make one decision, nothing settled.
    ex = execution({
        "api": ("codegen", TaskOutput(summary="api", findings=[
            Finding(severity="high", topic="password storage", detail="sha-256", recommendation="bcrypt")])),
        "db": ("database", TaskOutput(summary="db", findings=[
            Finding(severity="high", topic="password storage", detail="unsalted", recommendation="argon2id")],
            recommendations=[rec("password storage", "argon2id")])),
        "audit": ("security", None),
    })
    s = settle(ex)
    assert s.decisions == ["password storage: argon2id (database) or bcrypt (codegen)?"]
    assert all(r.decision_needed for r in s.recommendations)
