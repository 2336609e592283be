"""The agency's money view in the portal API: the agency summary, the customer picker, a client's statement
and its CSV export. Each client's own money fields are in the client objects (portal.api).

Routes join the portal API blueprint (same bearer sessions, tenancy and error answers); the factory imports
this module before mounting it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Iterator

from flask import Response, abort, g, jsonify, request, stream_with_context

from billing.clients import list_clients
from billing.customers import QUERY_MAX, find_customers
from billing.exports import MAX_DAYS, export_rows
from billing.periods import money_summary
from billing.statements import client_statements
from portal.api import _in_scope, _visible_client, agency_user, blueprint
from portal.customer_view import summary_for_customer

EXPORT_DEFAULT_DAYS = 30


@blueprint.get("/summary")
def summary():
    """Total this period's estimated charges and units per currency; count clients and failing ones."""
    answer = money_summary(g.agency, _visible_clients())
    return jsonify(answer if g.portal_session.sees_agency_settings else summary_for_customer(answer))


@blueprint.get("/customers")
@agency_user
def customers():
    """Search the agency's Stripe customers by name, email or id (the customer picker)."""
    query = request.args.get("q", "")
    if len(query) > QUERY_MAX:
        abort(400, f"q must be at most {QUERY_MAX} characters")
    return jsonify(customers=find_customers(g.agency, query))


@blueprint.get("/statement")
def statement():
    """Show each visible client's statement: this period, the daily usage and the previous periods.

    What a subaccount user (the agency's customer) opens first: names and amounts, no Stripe ids.
    """
    return jsonify(statements=client_statements(g.agency, _visible_clients()))


@blueprint.get("/clients/<int:client_id>/export.csv")
def export_csv(client_id: int):
    """Stream a client's usage events and unit reports from ``from`` to ``to`` (dates, both included) as CSV."""
    client = _visible_client(client_id)
    start, end = _date_range(request.args.get("from"), request.args.get("to"))
    rows = export_rows(client, start, end, for_agency=g.portal_session.sees_agency_settings)
    name = f"rebill-client-{client.id}-{start:%Y-%m-%d}-to-{(end - dt.timedelta(days=1)):%Y-%m-%d}.csv"
    return Response(
        stream_with_context(_csv_lines(rows)),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


def _visible_clients():
    return [client for client in list_clients(g.agency) if _in_scope(client)]


def _date_range(first: str | None, last: str | None) -> tuple[dt.datetime, dt.datetime]:
    """Read ``from``/``to`` (YYYY-MM-DD, UTC days, both included; default the last 30 days) or answer 400."""
    try:
        today = dt.datetime.now(dt.UTC).date()
        end_day = dt.date.fromisoformat(last) if last else today
        start_day = dt.date.fromisoformat(first) if first else end_day - dt.timedelta(days=EXPORT_DEFAULT_DAYS - 1)
    except ValueError:
        abort(400, "from and to must be dates like 2026-11-30")
    if start_day > end_day:
        abort(400, "from must not be after to")
    if (end_day - start_day).days >= MAX_DAYS:
        abort(400, f"export at most {MAX_DAYS} days at a time")
    if end_day >= dt.date.max:
        abort(400, "to is too far in the future")
    start = dt.datetime.combine(start_day, dt.time(), dt.UTC)
    return start, dt.datetime.combine(end_day + dt.timedelta(days=1), dt.time(), dt.UTC)


def _csv_lines(rows: Iterable[list]) -> Iterator[str]:
    """Write rows with the csv module (quoting as RFC 4180), one line at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(row)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
