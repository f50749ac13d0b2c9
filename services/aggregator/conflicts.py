"""Conflicts between agents, and how they are settled.

Detected, per topic (case, spacing and punctuation aside, in any script, with a few synonyms; a topic that is the
name of one well-known risk, "Cross-site request forgery (CSRF)", "CSRF tokens", is that risk's):
- approach vs risk: a codegen/database recommendation on a topic where security reports a finding
  whose recommendation differs (the seed's CSRF example), or a finding of medium severity or worse that says
  no fix;
- different tools: two agents recommending different choices for the same topic;
- contradictory findings: findings on the same topic whose severities are two or more levels apart, or
  another agent's finding that says to do something other than security's about the same risk (its finding's
  advice, or where it reports no finding on the topic, the one approach it recommends).

Settled by rule: 1. security's recommendation always applies (``security_first``; where security
reported several findings on a topic, its most severe one's); an approach security found a risk in, with no fix
named, stands only once the client confirms it addresses the risk (a decision); 2. agreeing or complementary advice is
merged; 3. a disagreement security is not part of, or one between two security tasks, is flagged for the
PM and becomes a decision for the client, each option listed once. With ``conflict_resolution: flag_all``
every conflict is flagged. Every override is recorded in the audit trail. Security's findings are never
dropped: each distinct one stands; so does another agent's that security does not contradict, unless it adds
nothing to security's.
"""

from __future__ import annotations

import unicodedata
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
SYNONYMS = {  # a risk's names are in RISKS (below)
    "sessions": "sessionhandling",
    "sessionmanagement": "sessionhandling",
    "authsessions": "sessionhandling",
    "db": "database",
    "datastore": "database",
    "primarydatabase": "database",
    "payment": "payments",
    "paymentprocessing": "payments",
}
# Risks with one name each, spelt out or not: a topic that is one of these names (spelt out, abbreviated or both,
# with words such as "protection" or "tokens" at most) is that risk. One that says more, "XSS in the search form",
# "ORM (prevents SQL injection)", stays a topic of its own.
RISKS = {
    ("csrf",): "csrf", ("xsrf",): "csrf", ("cross", "site", "request", "forgery"): "csrf",
    ("xss",): "xss", ("cross", "site", "scripting"): "xss",
    ("sql", "injection"): "sqlinjection", ("sqli",): "sqlinjection",
    ("ssrf",): "ssrf", ("server", "side", "request", "forgery"): "ssrf",
    ("clickjacking",): "clickjacking", ("idor",): "idor", ("insecure", "direct", "object", "reference"): "idor",
    ("insecure", "direct", "object", "references"): "idor",
}
QUALIFIERS = frozenset({"anti", "protection", "protections", "prevention", "preventions", "mitigation",
                        "mitigations", "defense", "defenses", "defence", "defences", "attack", "attacks",
                        "vulnerability", "vulnerabilities", "risk", "risks", "token", "tokens"})
# A topic written as one word: a synonym, or a risk's name run together ("CrossSiteRequestForgery", "SQLInjection").
ONE_WORD = {**SYNONYMS, **{"".join(phrase): risk for phrase, risk in RISKS.items()}}
BLOCKING = SEVERITY_RANK["medium"]  # a finding this severe, without a fix, keeps an approach to its topic unsettled


def _letters(text: str, keep: str = "", apart: bool = False) -> str:
    """``text`` as compared: its letters (with their marks) and digits, in any script and either Unicode form,
    case aside; spacing and punctuation dropped but for the characters in ``keep`` (``apart``: each of them a
    space, so that the words stay apart)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch if unicodedata.category(ch)[0] in "LMN" or ch in keep else " " if apart else ""
                   for ch in folded)


def topic_key(topic: str) -> str:
    """A topic as compared (see ``_letters``), a few synonyms merged, one that names a single known risk as that
    risk; one of punctuation alone as written."""
    key = _letters(topic) or topic.strip().casefold()
    if key in ONE_WORD:
        return ONE_WORD[key]
    words = _letters(topic, apart=True).split()
    named, rest = set(), list(words)
    for phrase, risk in sorted(RISKS.items(), key=lambda item: -len(item[0])):  # "cross site request forgery" first
        n = len(phrase)
        for i in range(len(rest) - n + 1):
            if tuple(rest[i:i + n]) == phrase:
                named.add(risk)
                rest[i:i + n] = [""] * n
    return named.pop() if len(named) == 1 and not set(rest) - QUALIFIERS - {""} else key


def _norm(text: str | None) -> str:
    """Advice as compared (see ``_letters``): "C#" and "C++" stay apart."""
    return _letters(text or "", keep="#+")


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
        return _norm(self.rec.choice)

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
        conflicts, recommendations = len(out.conflicts), len(out.recommendations)
        advice = _settle_findings(out, topic, finds.get(key, []), recs.get(key, []), flag_all)
        _settle_recommendations(out, topic, recs.get(key, []) + advice, finds.get(key, []), flag_all)
        if flag_all and any(c.rule == "flag" for c in out.conflicts[conflicts:]):
            for r in out.recommendations[recommendations:]:  # the topic is the client's decision: none of it settled
                r.decision_needed = True
    out.findings.sort(key=lambda f: -SEVERITY_RANK[f.severity])
    return out


def _settle_findings(out: Settlement, topic: str, finds: list[_Find], recs: list[_Rec], flag_all: bool) -> list[_Rec]:
    """Security's findings all stand (the same one reported twice, once). Another agent's finding that rates the
    risk two or more levels apart from security's most severe, or says to do something else about it than security
    does (the advice of its most severe findings; where those name none, its other advice on the topic), is a
    conflict security wins; one that does neither stands beside security's, unless it adds nothing to them.
    Security's reviews advising differently on the risk are a decision for the client. Where security reports no
    finding but recommends one approach to the topic, a finding that advises otherwise is a conflict security wins
    too: the finding stands with security's approach for its fix. Without security every distinct finding stands;
    severities two or more levels apart, or fixes that differ, are flagged. Returns the findings' advice that is to
    be settled with the recommendations on the topic (see ``_approached``)."""
    if not finds:
        return []
    security = [f for f in finds if f.pool == "security"]
    if not security:
        finds, advice = _approached(out, topic, finds, recs, flag_all)
        worst, mild = max(finds, key=lambda f: f.rank), min(finds, key=lambda f: f.rank)
        fixes = [_advice(f) for f in finds if f.finding.recommendation]
        if worst.rank - mild.rank >= 2:
            _flag_findings(out, topic, finds)
        elif not advice and len(_options(fixes)) > 1:
            advice = fixes  # fixes that differ: options of the topic's one decision, beside its recommendations
        out.findings += [f.finding for f in _distinct(finds)]
        return advice
    out.findings += [f.finding for f in _distinct(security)]
    standing = max(security, key=lambda f: f.rank)
    # What security advises on its most severe findings (two security tasks may advise differently: either counts).
    wants = {_norm(f.finding.recommendation) for f in security if f.rank == standing.rank and f.finding.recommendation}
    said = ([f.finding.recommendation for f in sorted(security, key=lambda f: -f.rank) if f.finding.recommendation]
            + [r.rec.choice for r in recs if r.pool == "security"])
    held_to = wants or {_norm(a) for a in said}  # where its most severe findings name no fix, its other advice
    against = [f for f in finds if f.pool != "security" and (
        abs(f.rank - standing.rank) >= 2
        or (held_to and f.finding.recommendation and _norm(f.finding.recommendation) not in held_to))]
    out.findings += [f.finding for f in _distinct([f for f in finds if f.pool != "security" and f not in against
                                                   and not _repeats(f, security)])]
    fixes = [_advice(f) for f in against if f.finding.recommendation]
    if not wants and fixes and (flag_all or len(held_to) > 1):
        # No one advice of security's stands over the others' fixes (flag_all, or security's own differs): they are
        # options of the topic's one decision, beside security's, none settled; their findings stand meanwhile.
        out.findings += [f.finding for f in _distinct(against)]
        return fixes
    top = [f for f in security if f.rank == standing.rank]
    if len(wants) > 1 and not against and not recs:  # with recommendations on the topic, those settle name them all
        _flag_findings(out, topic, top)
        return []
    if not against:
        return []
    if flag_all or len(wants) > 1:  # flag_all; or security's reviews advise differently: no one advice stands
        _flag_findings(out, topic, [*(top if len(wants) > 1 else [standing]), *against])
        worst = max(against, key=lambda f: f.rank)
        if worst.rank > standing.rank:
            out.findings.append(worst.finding)  # treated as the more severe until the PM decides
        return []
    fix = f": {standing.finding.recommendation or said[0]}" if said else ""
    _conflict(out, "contradictory_findings", topic, [standing, *against], "security_first",
              f"security's assessment stands: {standing.finding.severity}{fix}", standing)
    return []


def _repeats(f: _Find, security: list[_Find]) -> bool:
    """Whether another agent's finding adds nothing to security's: it gives advice security gives on the topic, or
    none and says what one of security's says."""
    if f.finding.recommendation:
        return any(_norm(f.finding.recommendation) == _norm(s.finding.recommendation) for s in security)
    return any(_norm(f.finding.detail) == _norm(s.finding.detail) for s in security)


def _approached(out: Settlement, topic: str, finds: list[_Find], recs: list[_Rec],
                flag_all: bool) -> tuple[list[_Find], list[_Rec]]:
    """Findings on a topic security reports no risk on, against the approach security recommends for it. A fix
    that differs from security's one approach is a conflict security wins: the finding stands, with security's
    approach. Where no one approach settles it (``flag_all``, or security's recommendations differ), the fixes go to
    the recommendations' settling as options beside theirs: one decision names them all. The findings as they stand,
    and those options."""
    approaches = _options([r for r in recs if r.pool == "security"])
    choices = {rs[0].choice for rs in approaches}
    against = [f for f in finds if f.finding.recommendation and _norm(f.finding.recommendation) not in choices]
    if not approaches or not against:
        return finds, []
    if flag_all or len(approaches) > 1:
        return finds, [_advice(f) for f in against]
    approach = approaches[0][0]
    _conflict(out, "approach_vs_risk", topic, [*against, approach], "security_first",
              f"security's recommendation applies: {approach.rec.choice}", approach)
    fixed = {"recommendation": approach.rec.choice}
    return [_Find(f.task_id, f.pool, f.finding.model_copy(update=fixed)) if f in against else f for f in finds], []


def _distinct(finds: list[_Find]) -> list[_Find]:
    """Each finding once: the same severity and advice reported twice (two security tasks) is one finding."""
    seen: dict[tuple[int, str, str], _Find] = {}
    for f in finds:
        seen.setdefault((f.rank, _norm(f.finding.recommendation), _norm(f.finding.detail)), f)
    return list(seen.values())


def _flag_findings(out: Settlement, topic: str, finds: list[_Find]) -> None:
    worst, mild = max(finds, key=lambda f: f.rank), min(finds, key=lambda f: f.rank)
    differ = (f"assessments differ ({mild.finding.severity} vs {worst.finding.severity})" if worst.rank > mild.rank
              else "the advice differs")
    _conflict(out, "contradictory_findings", topic, finds, "flag",
              f"{differ}; treated as the more severe until the PM decides", None)
    out.decisions.append(f"{topic}: agents disagree (" + "; ".join(
        f"{f.pool} {f.finding.severity}" + (f": {f.finding.recommendation}" if f.finding.recommendation else "")
        for f in finds) + ")")


def _settle_recommendations(out: Settlement, topic: str, recs: list[_Rec], finds: list[_Find],
                            flag_all: bool) -> None:
    if not recs:
        return
    # Rule 1 against an approach: security found a risk on this topic and says what to do instead (the advice of
    # its most severe finding, the one its assessment stands on).
    fixes = [f for f in finds if f.pool == "security" and f.finding.recommendation]
    risks = [f for f in finds if f.pool == "security" and f.rank >= BLOCKING]
    if risks and not fixes and not any(r.pool == "security" for r in recs):
        # A risk, and no word from security on what to do: the approaches do not stand until shown to address it.
        _unsettled(out, topic, recs, max(risks, key=lambda f: f.rank), flag_all)
        return
    if fixes:
        top = [f for f in fixes if f.rank == max(g.rank for g in fixes)]
        if len(_options([_advice(f) for f in top])) > 1:  # two security tasks advise differently: the client decides
            _flag_options(out, topic, [*(_advice(f) for f in top), *recs], [*top, *recs])
            return
        fix = top[0]
        wanted = _norm(fix.finding.recommendation)
        clashing = [r for r in recs if r.pool != "security" and r.choice != wanted]
        agreeing = [r for r in recs if r.choice == wanted]
        given = [*(_advice(f) for f in top), *agreeing]  # security's advice, with everyone who gave it
        if clashing and flag_all:
            _flag_options(out, topic, [*given, *clashing], [*clashing, fix],
                          "flagged for the PM (conflict_resolution: flag_all)")
        elif clashing:
            _conflict(out, "approach_vs_risk", topic, [*clashing, fix], "security_first",
                      f"security's recommendation applies: {fix.finding.recommendation}", fix)
            out.recommendations.append(_merged(topic, given))
        elif agreeing:
            out.recommendations.append(_merged(topic, given))
        recs = [r for r in recs if r not in clashing and r not in agreeing]  # security's own other advice
        if not recs:
            return

    options = _options(recs)
    if len(options) == 1:
        # Rule 2: agreeing advice merges into one recommendation carrying every rationale.
        out.recommendations.append(_merged(topic, recs))
        return
    security = [rs for rs in options if any(r.pool == "security" for r in rs)]
    if len(security) == 1 and not flag_all:
        winner = next(r for r in security[0] if r.pool == "security")
        _conflict(out, "different_tools", topic, recs, "security_first",
                  f"security's choice applies: {winner.rec.choice}", winner)
        out.recommendations.append(_merged(topic, security[0]))
        return
    # Rule 3: irreconcilable without one word from security (none, or two security tasks that differ).
    _flag_options(out, topic, recs, recs)


def _unsettled(out: Settlement, topic: str, recs: list[_Rec], risk: _Find, flag_all: bool) -> None:
    """Approaches to a topic security reports a risk on without naming a fix: security's finding stands, and each
    approach waits for the client to confirm that it addresses the risk."""
    finding = risk.finding
    said = f"{finding.severity} risk" + (f": {finding.detail}" if finding.detail else "")
    _conflict(out, "approach_vs_risk", topic, [*recs, risk], "flag" if flag_all else "security_first",
              f"security's finding stands ({said}); the approach is not settled until it is shown to address it",
              None)  # nothing replaced it: it waits for the client, so no override goes in the audit trail
    for rs in _options(recs):
        out.decisions.append(f"{topic}: security reports a {said}; does {_option(rs)} address it?")
        out.recommendations.append(_merged(topic, rs, decision_needed=True))


def _flag_options(out: Settlement, topic: str, recs: list[_Rec], parties: Sequence[Said],
                  resolution: str = "flagged for the PM: a decision for the client") -> None:
    """A disagreement no rule settles: the client decides; every option stays listed, once, with everyone who gave
    it, none of them settled."""
    options = _options(recs)
    kind: ConflictKind = "approach_vs_risk" if any(isinstance(p, _Find) for p in parties) else "different_tools"
    _conflict(out, kind, topic, parties, "flag", resolution, None)
    out.decisions.append(f"{topic}: " + " or ".join(_option(rs) for rs in options) + "?")
    out.recommendations += [_merged(topic, rs, decision_needed=True) for rs in options]


def _advice(f: _Find) -> _Rec:
    """A finding's advice, as a recommendation from its task (its detail the rationale)."""
    return _Rec(f.task_id, f.pool, Recommendation(topic=f.finding.topic, choice=f.finding.recommendation,
                                                  rationale=f.finding.detail))


def _options(recs: list[_Rec]) -> list[list[_Rec]]:
    """The recommendations grouped by what they advise, in the order first given."""
    by_choice: dict[str, list[_Rec]] = {}
    for r in recs:
        by_choice.setdefault(r.choice, []).append(r)
    return list(by_choice.values())


def _option(recs: list[_Rec]) -> str:
    return f"{recs[0].rec.choice} ({', '.join(dict.fromkeys(r.pool for r in recs))})"


def _merged(topic: str, recs: list[_Rec], decision_needed: bool = False) -> ResolvedRecommendation:
    return ResolvedRecommendation(
        topic=topic, choice=recs[0].rec.choice,
        rationale=" / ".join(dict.fromkeys(r.rec.rationale for r in recs if r.rec.rationale)),
        sources=list(dict.fromkeys(r.task_id for r in recs)), decision_needed=decision_needed)


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
