"""Rule-based task distributor: which pool a piece of work belongs to, and how sure we are.

Scores are keyword weights (multi-word phrases count more, and their words are not counted again
for any pool)
divided by the number of words, so a long text is not favoured for being long. Nothing matched →
"multi" (the PM must decide). Equal best scores break towards security, then database, then
codegen: when in doubt, the stricter reviewer looks first.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal

from shared.names import POOLS, Pool

KEYWORDS: dict[Pool, dict[str, float]] = {
    "codegen": {
        "build": 1, "implement": 2, "code": 1, "website": 2, "site": 1, "web": 1, "app": 1, "application": 1,
        "frontend": 3, "backend": 3, "api": 2, "endpoint": 2, "endpoints": 2, "ui": 2, "page": 1, "pages": 1,
        "component": 2, "components": 2, "react": 3, "vue": 3, "javascript": 2, "typescript": 2,
        "python": 2, "refactor": 3, "feature": 1, "features": 1, "integration": 1, "integrate": 1,
        "deploy": 1, "cart": 1, "ordering": 1, "booking": 1, "dashboard": 2, "form": 1, "forms": 1,
        # A change to make is code to write, whatever it is about ("fix the SQL injection in search").
        "fix": 2, "bug": 2, "add": 1, "write": 1, "tests": 2, "test": 1, "rename": 2, "upgrade": 1,
    },
    "security": {
        "security": 3, "secure": 2, "audit": 3, "vulnerability": 3, "vulnerabilities": 3, "auth": 2,
        "authentication": 2, "authorization": 2, "login": 1, "password": 2, "passwords": 2, "csrf": 3,
        "xss": 3, "injection": 3, "owasp": 3, "encrypt": 2, "encryption": 2, "pci": 3, "gdpr": 2,
        "payment": 2, "payments": 2, "compliance": 2, "permissions": 2, "threat": 2, "pentest": 3,
        "secrets": 2, "tls": 2,
    },
    "database": {
        "database": 3, "db": 3, "schema": 3, "sql": 3, "migration": 3, "migrate": 3, "migrations": 3,
        "table": 2, "tables": 2, "index": 2, "indexes": 2, "query": 2, "queries": 2, "postgres": 3,
        "postgresql": 3, "mysql": 3, "mongodb": 3, "orders": 1, "inventory": 1, "menu": 1,
        "reservations": 1, "records": 1, "data": 1, "backup": 2, "replication": 2,
    },
}

PHRASES: dict[Pool, dict[str, float]] = {
    "codegen": {"online ordering": 3, "user interface": 3, "rest api": 4, "landing page": 3, "web app": 3},
    "security": {
        "sql injection": 5, "access control": 4, "penetration test": 5, "online payment": 4,
        "security audit": 5, "rate limiting": 3,
    },
    "database": {"data model": 4, "schema design": 5, "query optimization": 5, "database migration": 6},
}

TIE_BREAK: tuple[Pool, ...] = ("security", "database", "codegen")
CONFIDENT = 0.5  # below this share of the total score a single-pool routing is called uncertain


@dataclass(frozen=True)
class Distribution:
    pool: Pool | Literal["multi"]
    confidence: float
    scores: dict[str, float]
    matched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def confident(self) -> bool:
        return self.pool != "multi" and self.confidence >= CONFIDENT

    def pools(self, every_match: bool = False) -> list[Pool]:
        """The pools the text is work for: those that matched at least half as strongly as the best, so a
        passing mention gets no specialist of its own; with ``every_match``, every pool that matched."""
        if self.pool == "multi":
            return []
        least = 0.0 if every_match else self.scores[self.pool] / 2
        return [p for p in POOLS if self.scores[p] > 0 and self.scores[p] >= least]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def analyze(text: str) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Per-pool score (weight per word) and the terms that matched; a matched phrase uses up its words."""
    words = _words(text)
    total = max(1, len(words))
    raw: dict[str, float] = dict.fromkeys(TIE_BREAK, 0.0)
    matched: dict[str, list[str]] = {p: [] for p in TIE_BREAK}
    # The text is now words joined by single spaces, so " phrase " is a whole-word match: plain
    # substring tests instead of one \b…\b regex scan per phrase (about 3× faster on a 2 kB request).
    rest = f" {' '.join(words)} "
    for pool in TIE_BREAK:
        for phrase, weight in PHRASES[pool].items():
            needle = f" {phrase} "
            if needle in rest:
                matched[pool].append(phrase)
                raw[pool] += weight
                while needle in rest:  # adjacent repeats share a space: replace until none is left
                    rest = rest.replace(needle, "   ")  # no later phrase may span the gap
    for word in rest.split():
        for pool in TIE_BREAK:
            if word in KEYWORDS[pool]:
                matched[pool].append(word)
                raw[pool] += KEYWORDS[pool][word]
    # Not rounded: a pool at exactly half the best must compare as half (rounded, 1/3 fell below 2/3 / 2).
    return {p: v / total for p, v in raw.items()}, matched


def distribute(text: str) -> Distribution:
    """Best pool for ``text`` with a confidence in [0, 1], or "multi" when nothing matches."""
    scores, matched = analyze(text)
    best = max(scores.values())
    if best == 0:
        return Distribution("multi", 0.0, scores, matched)
    pool = next(p for p in TIE_BREAK if scores[p] == best)
    return Distribution(pool, round(best / sum(scores.values()), 4), scores, matched)


_WHOLE = re.compile(r"\b(website|site|app|application|platform|store|shop|portal|dashboard|service|system|"
                    r"marketplace)\b", re.IGNORECASE)
# "Build a …", "create me an …", "develop our new …": a verb that makes something new, then its object. Not "make the
# button blue", "the build of our app fails" or "don't build a website" (whatever its apostrophe and spacing).
_BUILD = re.compile(r"(?<!n't )(?<!not )\b(build|create|make|develop|launch|ship)\s+(me\s+|us\s+)?(a|an|new|my|our)\b",
                    re.IGNORECASE)
_SPACED = re.compile(r"\s+")  # "don't  build", "don't\nbuild": one space, as _BUILD's look-behinds expect
_AUDIT = re.compile(r"\b(audit|review|assess|pen ?test|penetration test|threat model)\w*\b", re.IGNORECASE)


def _then(first: re.Pattern[str], then: re.Pattern[str], text: str, within: int | None = None) -> bool:
    """Whether ``first`` occurs before ``then`` (at most ``within`` characters after one of its matches). Linear in
    the text: one pattern with ``.*`` between them takes the square of its length (a minute for a 100 kB message),
    and within a bound each match looks no further than it."""
    if within is None:
        m = first.search(text)
        return m is not None and then.search(text, m.end()) is not None
    return any(then.search(text, m.end(), m.end() + within) for m in first.finditer(text))


def looks_like_project(text: str) -> bool:
    """"Build a … website/app/…": a project that spans several specialities, the thing built named within a few
    words ("create a SQL query that lists the shop's customers" builds a query, not the shop)."""
    return _then(_BUILD, _WHOLE, _SPACED.sub(" ", text.replace("\u2019", "'")), within=40)


def looks_like_security_audit(text: str, d: Distribution) -> bool:
    """Security work and nothing else, a review of a whole site or system ("audit our shop before launch"):
    independent reviews of its areas, which the security pool runs side by side. A narrower one ("audit the
    login flow") stays one task."""
    return d.pools() == ["security"] and _then(_AUDIT, _WHOLE, text)


@dataclass(frozen=True)
class Layout:
    """How the PM's rules lay out a request (``rules_layout``): a project's delivery, a security audit's
    reviews, or a task per pool whose keywords matched."""

    kind: Literal["project", "audit", "pools"]
    pools: list[Pool]  # the pools they give work to
    d: Distribution

    @property
    def pool(self) -> Pool:
        """The pool of one task for the whole request: codegen builds a project, security audits, else the best
        match (codegen when nothing matched)."""
        if self.kind != "pools":
            return "codegen" if self.kind == "project" else "security"
        return "codegen" if self.d.pool == "multi" else self.d.pool


def rules_layout(message: str, force_parallel: bool = False, project: str | None = None) -> Layout:
    """The layout the PM's rules give ``message`` (keywords of the ``project``'s name count too); with
    ``force_parallel``, every pool that matched gets a task, not only the strong ones."""
    d = distribute(f"{project or ''} {message}")
    if looks_like_project(message):
        return Layout("project", ["database", "codegen", "security"], d)
    if looks_like_security_audit(message, d):
        return Layout("audit", ["security"], d)
    return Layout("pools", d.pools(every_match=force_parallel) or ["codegen"], d)


@dataclass(frozen=True)
class Routing:
    """The agent router's decision for one chat message, and how long it took to make."""

    parallel: bool
    reason: str
    pool: Pool  # the specialist a single-agent answer goes to
    pools: list[str]  # the pools the PM's rules would give work
    decision_ms: float


def should_use_parallel_execution(message: str, *, enabled: bool, force_parallel: bool = False,
                                  project: str | None = None) -> Routing:
    """Parallel when configured and either asked for, a project, or work for more than one specialist."""
    began = time.perf_counter()
    lay = rules_layout(message, force_parallel, project)
    pool, pools = lay.pool, list[str](lay.pools)
    if not enabled:
        parallel, reason = False, "parallel execution is disabled (parallel_execution.enabled)"
        pools = [pool]  # one specialist answers
    elif force_parallel:
        parallel, reason = True, "force_parallel"
    elif lay.kind == "project":
        parallel, reason = True, "a project: the PM splits it across the specialist pools"
    elif lay.kind == "audit":
        parallel, reason = True, "a security audit: the PM splits it into reviews the security pool runs in parallel"
    elif len(pools) > 1:
        parallel, reason = True, f"work for several specialists: {', '.join(pools)}"
    elif lay.d.pool == "multi":  # nothing matched
        parallel, reason = False, "no specialist stands out: codegen takes it"
    else:
        parallel, reason = False, f"one specialist suffices: {pool} (confidence {lay.d.confidence:.2f})"
    return Routing(parallel, reason, pool, pools, round((time.perf_counter() - began) * 1000, 4))
