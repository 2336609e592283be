"""Stripe's time limits the billing core depends on, each defined once; Rebill's margins derive from them.

The margins: OLDEST_USAGE_TIMESTAMP below; billing.report_claims' MAX_EVENT_AGE and DEDUPE_SAFE_AGE; the usage
API's flag for old usage (capri.validation). The fake Stripe (stripe_fake/app.py) keeps its own copy of the
limits on purpose: it models Stripe, so a wrong number here fails the tests instead of moving the fake with it.
"""

from __future__ import annotations

import datetime as dt

# Stripe takes meter event timestamps "within the past 35 calendar days" (docs/stripe.md §1.3,
# docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api).
METER_EVENT_MAX_AGE = dt.timedelta(days=35)
# Stripe keeps meter event identifiers "within a rolling period of at least 24 hours" (docs/stripe.md §1.3).
IDENTIFIER_DEDUPE_WINDOW = dt.timedelta(hours=24)
# Stripe's meter event summaries lag the events: "eventually consistent" (docs/stripe.md §1.8). Rebill reads a
# total only for events at least this old (the daily gap check, the >24 h check of a report in doubt).
TOTALS_SETTLE = dt.timedelta(hours=1)
# Aggregation stamps units within that limit, with an hour of slack for the time between writing the outbox
# row and sending it.
OLDEST_USAGE_TIMESTAMP = METER_EVENT_MAX_AGE - dt.timedelta(hours=1)
# Usage younger than this is in the customer's current period or in the previous period's finalization grace
# (one hour unless the account changed it: docs.stripe.com/billing/subscriptions/usage-based/configure-grace-
# period), so a meter event carries its own time without reading the subscription (billing.reporting), and
# a waiting report counts in the period of its usage time until it is older (billing.periods).
PERIOD_CHECK_AGE = dt.timedelta(minutes=30)


def usage_timestamp(latest: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """Return the timestamp Stripe gets for units: the latest usage, never future, never > 35 days old."""
    if latest is None:
        return now
    return min(max(latest, now - OLDEST_USAGE_TIMESTAMP), now)
