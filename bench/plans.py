"""The benchmark's scenarios: client plans taken from the seed's examples, in seed seconds.

Each task's ``seconds`` is its simulated work in the seed's time scale; ``Scenario.plan(factor)``
turns that into a client plan (``tasks`` for POST /api/execute-parallel) whose
``context.simulate.latency_s`` is ``seconds × factor``, so a 240 s seed timeline runs in seconds.

Only the restaurant website has timings in the seed (serial ~240 s, parallel ~150 s); the task
durations below are chosen to reproduce exactly those two figures under the default pool limits.
The database migration and the security-only audit are named in the seed without timings: their
durations are ours, of the same order, and say so in the report. So is the marketplace, the "very large
project" for which the seed hopes for 2.0×: twelve tasks, more than the default ``max_tasks_per_execution``
(6) allows, so the benchmark's stack raises that limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    id: str
    pool: str
    description: str
    seconds: float
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    message: str
    steps: tuple[Step, ...]
    note: str = ""
    large: bool = False  # "large project" in the seed's sense (the ≥ 1.5× target)
    tags: dict[str, Any] = field(default_factory=dict)

    def plan(self, factor: float) -> list[dict[str, Any]]:
        """The client plan, every latency scaled by ``factor``."""
        return [
            {
                "id": s.id,
                "pool": s.pool,
                "description": s.description,
                "depends_on": list(s.depends_on),
                "context": {"simulate": {"latency_s": round(s.seconds * factor, 6)}},
            }
            for s in self.steps
        ]

    def durations(self, factor: float = 1.0) -> dict[str, float]:
        return {s.id: s.seconds * factor for s in self.steps}

    def deps(self) -> dict[str, tuple[str, ...]]:
        return {s.id: s.depends_on for s in self.steps}

    def pools(self) -> dict[str, str]:
        return {s.id: s.pool for s in self.steps}

    @property
    def serial_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


RESTAURANT = Scenario(
    name="restaurant",
    title="Restaurant website build",
    message="Build a restaurant website with online ordering: menu, cart, card checkout, order tracking, admin.",
    large=True,
    note="seed: serial ~240 s, parallel ~150 s",
    steps=(
        Step("schema", "database", "Database schema: menu, orders, customers, order status", 30),
        Step("seed_data", "database", "Order indexes and menu seed data", 45, ("schema",)),
        Step("backend", "codegen", "Backend API: menu, cart, orders and order tracking endpoints", 60, ("schema",)),
        Step("frontend", "codegen", "Frontend: menu browsing, cart, checkout and tracking pages", 45, ("backend",)),
        Step("payment", "codegen", "Payment integration: card checkout with the provider's hosted fields", 35,
             ("backend",)),
        Step("security_audit", "security", "Security audit: sessions, CSRF, the payment flow (PCI scope)", 25,
             ("payment",)),
    ),
)

MIGRATION = Scenario(
    name="migration",
    title="Database migration",
    message="Migrate our MySQL 5.7 database to PostgreSQL 16 without downtime.",
    note="seed names it, no timings: durations are ours",
    steps=(
        Step("migration_plan", "database", "Migration plan: MySQL 5.7 to PostgreSQL 16, table by table", 20),
        Step("schema_ddl", "database", "Translate the schema and write the migration scripts", 40,
             ("migration_plan",)),
        Step("data_copy", "database", "Data copy and backfill with row checksums", 40, ("migration_plan",)),
        Step("index_tuning", "database", "Indexes and query plans for the new engine", 30, ("migration_plan",)),
        Step("orm_update", "codegen", "Update the ORM models and raw queries for PostgreSQL", 40,
             ("migration_plan",)),
        Step("access_review", "security", "Access control review: roles, grants, encrypted columns", 30,
             ("migration_plan",)),
    ),
)

SECURITY_AUDIT = Scenario(
    name="security_audit",
    title="Security-only audit",
    message="Audit our web shop for security problems before launch.",
    note="seed names it, no timings: durations are ours; one pool of 2 slots caps it at 2.0×",
    steps=(
        Step("auth_review", "security", "Audit the login flow: sessions, CSRF, password storage", 30),
        Step("payment_review", "security", "PCI review of the checkout and payment flow", 30),
        Step("injection_scan", "security", "SQL injection and XSS review of every form and endpoint", 20),
        Step("secrets_scan", "security", "Secrets and dependency scan", 20),
    ),
)

MARKETPLACE = Scenario(
    name="marketplace",
    title="Marketplace platform build",
    message="Build a multi-vendor marketplace: vendor onboarding, catalogue and search, storefront, "
            "orders with split payouts, vendor portal.",
    note="a very large project (the seed hopes for 2.0×): twelve tasks, durations ours",
    steps=(
        Step("schema", "database", "Database schema: vendors, products, orders, payouts", 30),
        Step("threat_model", "security", "Threat model: vendor accounts, payouts, the public storefront", 20),
        Step("catalog_api", "codegen", "Catalogue API: products, categories, stock", 45, ("schema",)),
        Step("vendor_api", "codegen", "Vendor onboarding API: sign-up, verification, payout details", 40,
             ("schema",)),
        Step("orders_api", "codegen", "Orders API: cart, checkout, order status per vendor", 50, ("schema",)),
        Step("search_index", "database", "Search index and faceted product queries", 30, ("schema",)),
        Step("payments", "codegen", "Split payments: one charge, payouts to each vendor", 40, ("orders_api",)),
        Step("storefront", "codegen", "Storefront: search, product pages, cart and checkout", 45, ("catalog_api",)),
        Step("vendor_portal", "codegen", "Vendor portal: listings, orders, payouts", 40, ("vendor_api",)),
        Step("query_tuning", "database", "Indexes and query plans for orders and search", 25,
             ("orders_api", "search_index")),
        Step("payment_audit", "security", "Payment and payout review (PCI scope)", 30, ("payments", "threat_model")),
        Step("pentest", "security", "Penetration test of the storefront and the vendor portal", 30,
             ("storefront", "vendor_portal")),
    ),
)

SCENARIOS: tuple[Scenario, ...] = (RESTAURANT, MIGRATION, SECURITY_AUDIT, MARKETPLACE)


def fan_out(n_per_pool: dict[str, int], latency_s: float = 0.0) -> list[dict[str, Any]]:
    """Independent tasks (no dependencies), ``n`` per pool, each with the same simulated latency."""
    tasks = []
    for pool, n in n_per_pool.items():
        for i in range(n):
            tasks.append({
                "id": f"{pool}_{i + 1}",
                "pool": pool,
                "description": f"{pool} task {i + 1}",
                "context": {"simulate": {"latency_s": latency_s}},
            })
    return tasks


FAN_OUT_6 = {"codegen": 2, "security": 2, "database": 2}  # fits the default limits (3/2/2) in one wave
