"""The agency's money view in the portal API: each client's period and billing state, and the agency summary.

Routes join the portal API blueprint (same bearer sessions, tenancy and error answers); the factory imports
this module before mounting it.
"""

from __future__ import annotations

from flask import abort, g, jsonify, request

from billing.clients import list_clients
from billing.customers import QUERY_MAX, find_customers
from billing.periods import money_summary
from portal.api import _in_scope, agency_user, blueprint


@blueprint.get("/summary")
def summary():
    """Total this period's estimated charges and units per currency; count clients and failing ones."""
    visible = [client for client in list_clients(g.agency) if _in_scope(client)]
    return jsonify(money_summary(g.agency, visible))


@blueprint.get("/customers")
@agency_user
def customers():
    """Search the agency's Stripe customers by name, email or id (the customer picker)."""
    query = request.args.get("q", "")
    if len(query) > QUERY_MAX:
        abort(400, f"q must be at most {QUERY_MAX} characters")
    return jsonify(customers=find_customers(g.agency, query))
