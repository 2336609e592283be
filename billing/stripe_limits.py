"""Stripe's time limits the billing core depends on, each defined once; Rebill's margins derive from them."""

from __future__ import annotations

import datetime as dt

# Stripe takes meter event timestamps "within the past 35 calendar days" (docs/stripe.md §1.3,
# docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api).
METER_EVENT_MAX_AGE = dt.timedelta(days=35)
# Stripe keeps meter event identifiers "within a rolling period of at least 24 hours" (docs/stripe.md §1.3).
IDENTIFIER_DEDUPE_WINDOW = dt.timedelta(hours=24)
