"""Property: any stream of usage (duplicates, reordering), N changes, pauses/resumes, deletes and interleaved
aggregation passes ends exactly where an independent, event-by-event model of docs/billing-rules.md ends."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.clients import delete_client, update_client
from billing.ledger import UsageRecord
from billing.models import UsageEvent
from billing.units import aggregate_pending_usage
from core.database import db
from tests.billing.factories import NOW, fresh, make_client, record, reports_of

# Every event id always carries the same content (a duplicate is a retry of the same fact), so the stream
# is fully described by which ids arrive in which order. Content kinds, by the source that sends them:
KINDS = [
    ("capri", "chan-a", None, None, "tokens"),
    ("capri", "chan-a", None, None, "messages"),
    ("ghl", None, "loc-b", "outbound", "messages"),
    ("ghl", None, "loc-b", "inbound", "messages"),
    ("capri", None, "loc-b", None, "messages"),
    ("capri", None, "loc-b", None, "tokens"),
    ("capri", "chan-x", None, None, "tokens"),  # no client ever maps chan-x
]
EVENT_IDS = 40
CLIENT_SETUPS = [
    {"provider": "capri_api", "source_key": "chan-a"},
    {"provider": "ghl", "source_key": "loc-b"},
]
MESSAGE_SOURCES = ["ghl_outbound", "ghl_inbound", "ghl_all", "platform"]
_agencies = itertools.count(1)


def content(number: int, amounts: list[int]) -> dict:
    """The fixed content of event ``e<number>`` in one example."""
    source, channel, location, direction, measure = KINDS[number % len(KINDS)]
    amount = amounts[number]
    fields = {"source": source, "channel_id": channel, "location_id": location, "direction": direction}
    if measure == "tokens":
        return fields | {"input_tokens": amount // 3, "output_tokens": amount - amount // 3, "messages": 0}
    return fields | {"input_tokens": 0, "output_tokens": 0, "messages": 1 if source == "ghl" else amount % 50}


# ---- the model: the rules written event by event, independently of billing.units ------------------------


@dataclass
class ModelClient:
    key: tuple[str, str]  # ("channel", id) | ("location", id)
    charge_by: str
    message_source: str | None
    n: int
    paused: bool = False
    deleted: bool = False
    counted: int = 0
    units: int = 0
    remainder: int = 0
    reports: int = 0


# Which (source, direction) a GHL messages client counts, per message source.
ACCEPTED_MESSAGES = {
    "ghl_outbound": {("ghl", "outbound")},
    "ghl_inbound": {("ghl", "inbound")},
    "ghl_all": {("ghl", "outbound"), ("ghl", "inbound")},
    "platform": {("capri", None)},
}


@dataclass
class Model:
    clients: list[ModelClient]
    amounts: list[int]
    seen: set[int] = field(default_factory=set)
    pending: list[int] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)

    def ingest(self, number: int) -> None:
        if number not in self.seen:
            self.seen.add(number)
            self.pending.append(number)

    def aggregate(self) -> None:
        self._process(self.pending)
        self.pending = []

    def flush(self, client: ModelClient) -> None:
        mine = [number for number in self.pending if self._key(number) == client.key]
        self.pending = [number for number in self.pending if self._key(number) != client.key]
        self._process(mine)

    def set_n(self, client: ModelClient, n: int) -> None:
        if n == client.n:
            return  # not a change: nothing to flush
        self.flush(client)
        client.n = n
        self._log_units(client)

    def _process(self, numbers: list[int]) -> None:
        gained = {id(client): 0 for client in self.clients}
        for number in numbers:
            client = next((c for c in self.clients if c.key == self._key(number) and not c.deleted), None)
            if client is None:
                self.states[number] = "unmapped"
                continue
            quantity = self._measure(client, content(number, self.amounts))
            if quantity == 0:
                self.states[number] = "ignored"
            elif client.paused:
                self.states[number] = "paused"
            else:
                self.states[number] = "counted"
                client.counted += quantity
                client.remainder += quantity
                before = client.units
                self._log_units(client, report=False)
                gained[id(client)] += client.units - before
        for client in self.clients:
            client.reports += 1 if gained[id(client)] else 0

    @staticmethod
    def _log_units(client: ModelClient, report: bool = True) -> None:
        while client.remainder >= client.n:
            client.remainder -= client.n
            client.units += 1
            if report:
                client.reports += 1
                report = False

    @staticmethod
    def _key(number: int) -> tuple[str, str]:
        _, channel, location, _, _ = KINDS[number % len(KINDS)]
        return ("channel", channel) if channel else ("location", location)

    @staticmethod
    def _measure(client: ModelClient, event: dict) -> int:
        if client.charge_by == "tokens":
            return event["input_tokens"] + event["output_tokens"] if event["source"] == "capri" else 0
        if client.key[0] == "channel":
            return event["messages"] if event["source"] == "capri" else 0
        return (
            event["messages"]
            if (event["source"], event["direction"]) in ACCEPTED_MESSAGES[client.message_source]
            else 0
        )


# ---- the operations -------------------------------------------------------------------------------------

client_index = st.integers(0, len(CLIENT_SETUPS) - 1)
# Small and large N alike: small ones make units and carried remainders frequent.
billing_units = st.one_of(st.integers(1, 30), st.integers(1, 3000))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("ingest"), st.lists(st.integers(0, EVENT_IDS - 1), min_size=1, max_size=10)),
        st.tuples(st.just("aggregate"), st.integers(1, 5)),
        st.tuples(st.just("set_n"), client_index, billing_units),
        st.tuples(st.just("pause"), client_index),
        st.tuples(st.just("resume"), client_index),
        st.tuples(st.just("delete"), client_index),
    ),
    min_size=3,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ns=st.tuples(billing_units, billing_units),
    charge_bys=st.tuples(st.sampled_from(["tokens", "messages"]), st.sampled_from(["tokens", "messages"])),
    message_source=st.sampled_from(MESSAGE_SOURCES),
    amounts=st.lists(st.integers(1, 6000), min_size=EVENT_IDS, max_size=EVENT_IDS),
    steps=operations,
)
def test_any_stream_of_usage_and_edits_bills_exactly_what_the_rules_say(
    app_context, ns, charge_bys, message_source, amounts, steps
):
    agency = ensure_agency(f"company-property-{next(_agencies)}")
    clients = []
    for setup, n, charge_by in zip(CLIENT_SETUPS, ns, charge_bys, strict=True):
        ghl_messages = setup["provider"] == "ghl" and charge_by == "messages"
        source = message_source if ghl_messages else None
        clients.append(make_client(agency, billing_unit=n, charge_by=charge_by, message_source=source, **setup))
    model = Model(
        [
            ModelClient(
                key=("channel" if c.provider == "capri_api" else "location", c.source_key),
                charge_by=c.charge_by,
                message_source=c.message_source,
                n=c.billing_unit,
            )
            for c in clients
        ],
        amounts,
    )
    db.session.commit()

    for step in steps:
        kind = step[0]
        if kind == "ingest":
            record(agency, *[usage_record(number, amounts) for number in step[1]])
            for number in step[1]:
                model.ingest(number)
        elif kind == "aggregate":
            aggregate_pending_usage(batch_size=step[1])
            model.aggregate()
        else:
            index = step[1]
            client, mirror = clients[index], model.clients[index]
            if mirror.deleted:
                continue
            if kind == "set_n":
                update_client(agency, client.id, {"billing_unit": step[2]})
                model.set_n(mirror, step[2])
            elif kind in ("pause", "resume"):
                update_client(agency, client.id, {"status": "paused" if kind == "pause" else "active"})
                if mirror.paused != (kind == "pause"):
                    model.flush(mirror)
                    mirror.paused = kind == "pause"
            else:
                delete_client(agency, client.id)
                model.flush(mirror)
                mirror.deleted = True
        db.session.commit()
    aggregate_pending_usage()
    model.aggregate()
    db.session.commit()

    for client, mirror in zip(clients, model.clients, strict=True):
        client = fresh(client)
        assert (client.counted_usage, client.units_logged, client.remainder) == (
            mirror.counted,
            mirror.units,
            mirror.remainder,
        )
        assert client.units_logged == sum(report.units for report in reports_of(client))
        assert len(reports_of(client)) == mirror.reports  # one outbox row per client per pass or N change
        assert client.remainder < client.billing_unit
        counted = db.session.scalars(
            select(UsageEvent.counted).where(UsageEvent.client_id == client.id, UsageEvent.state == "counted")
        ).all()
        assert sum(counted) == client.counted_usage  # every counted event counted once, nothing else
    states = db.session.execute(
        select(UsageEvent.source_event_id, UsageEvent.state).where(UsageEvent.agency_id == agency.id)
    ).all()
    assert dict(states) == {f"e{number}": state for number, state in model.states.items()}


def usage_record(number: int, amounts: list[int]) -> UsageRecord:
    """The ledger record of event ``e<number>``."""
    return UsageRecord(source_event_id=f"e{number}", occurred_at=NOW, model="m", **content(number, amounts))
