"""What a subaccount user (the agency's customer) sees of a client: names and plain words, no Stripe internals.

The agency's Stripe ids (customer, price, product) and Stripe's own error texts are the agency's business:
they name objects in the agency's Stripe account and can carry account details. A subaccount user gets the
product, price and customer names the agency already sees, and a plain status instead of Stripe's words.
"""

from __future__ import annotations

from typing import Any

from billing.states import BillingState, ReportStatus

AGENCY_ONLY_CLIENT_FIELDS = (
    "stripe_product_id",
    "stripe_price_id",
    "stripe_customer_id",
    "payment_problem",
    "subscription_problem",
    "billing_problem",
)
# The billing states in plain words for the agency's customer.
BILLING_NOTES = {
    BillingState.OK: None,
    BillingState.FAILING: "billing needs your agency's attention",
    BillingState.PAUSED: "paused: usage is recorded but not billed",
    BillingState.STRIPE_DISCONNECTED: "billing is stopped on your agency's side",
}
REPORT_NOTES = {
    ReportStatus.SENT: "reported to Stripe",
    ReportStatus.PENDING: "waiting to be reported",
    ReportStatus.FAILED: "not reported yet; Rebill keeps trying",
}


def client_for_customer(client: dict[str, Any]) -> dict[str, Any]:
    """Return a client's JSON as a subaccount user sees it: names and a plain billing note, no Stripe ids."""
    shown = {name: value for name, value in client.items() if name not in AGENCY_ONLY_CLIENT_FIELDS}
    shown["billing_note"] = BILLING_NOTES.get(client.get("billing_state"), "billing needs your agency's attention")
    return shown


def usage_for_customer(usage: dict[str, Any]) -> dict[str, Any]:
    """Return a client's usage as a subaccount user sees it: reports without Stripe identifiers or errors."""
    reports = [
        {
            "units": report["units"],
            "status": report["status"],
            "note": REPORT_NOTES.get(report["status"], report["status"]),
            "created_at": report["created_at"],
            "sent_at": report["sent_at"],
        }
        for report in usage.get("reports", [])
    ]
    return usage | {"reports": reports}


def summary_for_customer(summary: dict[str, Any]) -> dict[str, Any]:
    """Return the money summary as a subaccount user sees it: which clients need attention, not why."""
    problems = [problem | {"problem": BILLING_NOTES[BillingState.FAILING]} for problem in summary.get("problems", [])]
    stopped = BILLING_NOTES[BillingState.STRIPE_DISCONNECTED] if summary.get("billing_problem") else None
    return summary | {"problems": problems, "billing_problem": stopped}
