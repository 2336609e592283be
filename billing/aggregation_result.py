"""What one aggregation pass did (billing.units), summed over its rounds and, after a failure, its agencies."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AggregationResult:
    events: int = 0  # events that left ``pending`` (counted, paused, ignored or unmapped)
    units: int = 0  # units logged (sum of the new outbox rows' units)
    reports: int = 0  # UnitReport outbox rows written (at most one per client)
    deferred: int = 0  # events left pending because their client was locked by an edit or another pass
    quarantined: int = 0  # events kept as "quarantined" (rule 12), of those that left pending
    failed_agencies: tuple[int, ...] = ()  # agencies whose events stay pending after an unforeseen error

    def __add__(self, other: AggregationResult) -> AggregationResult:
        return AggregationResult(*(getattr(self, field.name) + getattr(other, field.name) for field in fields(self)))
