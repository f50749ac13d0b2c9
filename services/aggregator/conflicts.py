"""Conflicts between agents, and how they are settled.

Detected, per topic (normalised, with a few synonyms):
- approach vs risk: a codegen/database recommendation on a topic where security reports a finding
  whose recommendation differs (the seed's CSRF example);
- different tools: two agents recommending different choices for the same topic;
- contradictory findings: findings on the same topic whose severities are two or more levels apart, or
  another agent's finding that says to do something other than security's about the same risk.

Settled by rule: 1. security's recommendation always applies (``security_first``); 2. agreeing or
complementary advice is merged; 3. a disagreement security is not part of is flagged for the PM and
becomes a decision for the client. With ``conflict_resolution: flag_all`` every conflict is flagged.
Every override is recorded in the audit trail.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.schemas import (
    Conflict,
    ConflictKind,
    Execution,
    Finding,
    Override,
    Position,
    Recommendation,
    ResolvedRecommendation,
    Rule,
)

SEVERITY_RANK = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
SYNONYMS = {
    "crosssiterequestforgery": "csrf",
    "csrfprotection": "csrf",
    "sessions": "sessionhandling",
    "sessionmanagement": "sessionhandling",
    "authsessions": "sessionhandling",
    "db": "database",
    "datastore": "database",
    "primarydatabase": "database",
    "payment": "payments",
    "paymentprocessing": "payments",
}


def topic_key(topic: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", topic.lower())
    return SYNONYMS.get(key, key)


@dataclass
class Settlement:
    conflicts: list[Conflict] = field(default_factory=list)
    audit: list[Override] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    recommendations: list[ResolvedRecommendation] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class _Rec:
    task_id: str
    pool: str
    rec: Recommendation

    @property
    def choice(self) -> str:
        return re.sub(r"[^a-z0-9]", "", self.rec.choice.lower())

    def position(self) -> Position:
        return Position(task_id=self.task_id, pool=self.pool, says=self.rec.choice)


@dataclass(frozen=True)
class _Find:
    task_id: str
    pool: str
    finding: Finding

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.finding.severity]

    def position(self) -> Position:
        return Position(task_id=self.task_id, pool=self.pool, severity=self.finding.severity,
                        says=self.finding.recommendation or self.finding.detail)


Said = _Rec | _Find


def settle(ex: Execution, mode: str = "security_first") -> Settlement:
    """Detect and resolve the conflicts among the completed tasks' outputs."""
    recs: dict[str, list[_Rec]] = {}
    finds: dict[str, list[_Find]] = {}
    topics: dict[str, str] = {}
    for t in ex.tasks:
        if t.output is None:
            continue
        for r in t.output.recommendations:
            recs.setdefault(topic_key(r.topic), []).append(_Rec(t.id, t.pool, r))
            topics.setdefault(topic_key(r.topic), r.topic)
        for f in t.output.findings:
            finds.setdefault(topic_key(f.topic), []).append(_Find(t.id, t.pool, f))
            topics.setdefault(topic_key(f.topic), f.topic)
    out = Settlement()
    flag_all = mode == "flag_all"
    for key, topic in topics.items():
        _settle_findings(out, topic, finds.get(key, []), flag_all)
        _settle_recommendations(out, topic, recs.get(key, []), finds.get(key, []), flag_all)
    out.findings.sort(key=lambda f: -SEVERITY_RANK[f.severity])
    return out


def _norm(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def _settle_findings(out: Settlement, topic: str, finds: list[_Find], flag_all: bool) -> None:
    """One finding per topic. Where security reported one, security's stands; another agent's that rates the
    risk two or more levels apart, or says to do something else about it, is a conflict security wins.
    Without security the most severe stands, and severities two or more levels apart are flagged."""
    if not finds:
        return
    security = [f for f in finds if f.pool == "security"]
    standing = max(security, key=lambda f: f.rank) if security else None
    worst = max(finds, key=lambda f: f.rank)
    mild = min(finds, key=lambda f: f.rank)
    wants = _norm(standing.finding.recommendation) if standing else ""
    against = [f for f in finds if f.pool != "security" and standing is not None and (
        abs(f.rank - standing.rank) >= 2 or (wants and f.finding.recommendation
                                             and _norm(f.finding.recommendation) != wants))]
    if not against and worst.rank - mild.rank < 2:
        out.findings.append((standing or worst).finding)
        return
    if standing is not None and not flag_all:
        fix = f": {standing.finding.recommendation}" if standing.finding.recommendation else ""
        _conflict(out, "contradictory_findings", topic, finds, "security_first",
                  f"security's assessment stands: {standing.finding.severity}{fix}", standing)
        out.findings.append(standing.finding)
        return
    _conflict(out, "contradictory_findings", topic, finds, "flag",
              f"assessments differ ({mild.finding.severity} vs {worst.finding.severity}); treated as the more "
              "severe until the PM decides", None)
    out.decisions.append(f"{topic}: agents disagree (" + "; ".join(
        f"{f.pool} {f.finding.severity}" + (f": {f.finding.recommendation}" if f.finding.recommendation else "")
        for f in finds) + ")")
    out.findings.append(worst.finding)


def _settle_recommendations(out: Settlement, topic: str, recs: list[_Rec], finds: list[_Find],
                            flag_all: bool) -> None:
    if not recs:
        return
    # Rule 1 against an approach: security found a risk on this topic and says what to do instead.
    fix = next((f for f in finds if f.pool == "security" and f.finding.recommendation), None)
    if fix is not None:
        wanted = _norm(fix.finding.recommendation)
        clashing = [r for r in recs if r.pool != "security" and r.choice != wanted]
        if clashing and flag_all:
            _conflict(out, "approach_vs_risk", topic, [*clashing, fix], "flag",
                      "flagged for the PM (conflict_resolution: flag_all)", None)
            out.decisions.append(f"{topic}: {fix.finding.recommendation} (security) or "
                                 f"{clashing[0].rec.choice} ({clashing[0].pool})?")
            # Every option stays listed, none of them settled.
            out.recommendations.append(ResolvedRecommendation(
                topic=topic, choice=fix.finding.recommendation, rationale=fix.finding.detail,
                sources=[fix.task_id], decision_needed=True))
            out.recommendations += [
                ResolvedRecommendation(topic=topic, choice=r.rec.choice, rationale=r.rec.rationale,
                                       sources=[r.task_id], decision_needed=True)
                for r in clashing
            ]
            recs = [r for r in recs if r not in clashing]
            if not recs:
                return
        elif clashing:
            _conflict(out, "approach_vs_risk", topic, [*clashing, fix], "security_first",
                      f"security's recommendation applies: {fix.finding.recommendation}", fix)
            out.recommendations.append(ResolvedRecommendation(
                topic=topic, choice=fix.finding.recommendation, rationale=fix.finding.detail,
                sources=[fix.task_id]))
            recs = [r for r in recs if r not in clashing]
            if not recs:
                return

    by_choice: dict[str, list[_Rec]] = {}
    for r in recs:
        by_choice.setdefault(r.choice, []).append(r)
    if len(by_choice) == 1:
        # Rule 2: agreeing advice merges into one recommendation carrying every rationale.
        rationale = " / ".join(dict.fromkeys(r.rec.rationale for r in recs if r.rec.rationale))
        out.recommendations.append(ResolvedRecommendation(
            topic=topic, choice=recs[0].rec.choice, rationale=rationale, sources=[r.task_id for r in recs]))
        return
    security = [r for r in recs if r.pool == "security"]
    if security and not flag_all:
        winner = security[0]
        _conflict(out, "different_tools", topic, recs, "security_first",
                  f"security's choice applies: {winner.rec.choice}", winner)
        out.recommendations.append(ResolvedRecommendation(
            topic=topic, choice=winner.rec.choice, rationale=winner.rec.rationale, sources=[winner.task_id]))
        return
    # Rule 3: irreconcilable without security's say: the client decides; every option stays listed.
    _conflict(out, "different_tools", topic, recs, "flag", "flagged for the PM: a decision for the client", None)
    out.decisions.append(f"{topic}: " + " or ".join(f"{r.rec.choice} ({r.pool})" for r in recs) + "?")
    out.recommendations += [
        ResolvedRecommendation(topic=topic, choice=r.rec.choice, rationale=r.rec.rationale, sources=[r.task_id],
                               decision_needed=True)
        for r in recs
    ]


def _conflict(out: Settlement, kind: ConflictKind, topic: str, parties: Sequence[Said],
              rule: Rule, resolution: str, winner: Said | None) -> None:
    """Record a conflict; with a winner, every differing position is an override in the audit trail."""
    out.conflicts.append(Conflict(kind=kind, topic=topic, positions=[p.position() for p in parties],
                                  rule=rule, resolution=resolution))
    if winner is None:
        return
    won = winner.position()
    for p in parties:
        lost = p.position()
        if p != winner and (lost.says, lost.severity) != (won.says, won.severity):
            out.audit.append(Override(rule=rule, topic=topic, overridden=lost, by=won))
