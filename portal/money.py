"""The agency's money view in the portal API: each client's period and billing state, and the agency summary.

Routes join the portal API blueprint (same bearer sessions, tenancy and error answers); the factory imports
this module before mounting it.
"""

from __future__ import annotations

from flask import g, jsonify

from billing.clients import list_clients
from billing.periods import money_summary
from portal.api import _in_scope, blueprint


@blueprint.get("/summary")
def summary():
    """Total this period's estimated charges and units per currency; count clients and failing ones."""
    visible = [client for client in list_clients(g.agency) if _in_scope(client)]
    return jsonify(money_summary(g.agency, visible))
