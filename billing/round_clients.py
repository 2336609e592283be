"""The clients one aggregation round holds (billing.units): found, locked in id order, within the round's room.

A round holds at most ``max_clients`` clients (bounded memory, bench/README.md); events of clients it has no room
for stay pending for the next round of the pass.
"""

from __future__ import annotations

import datetime as dt

from billing.aggregation_store import AggregationStore
from billing.client_tally import ClientTally, give_cap_room
from billing.models import RebillClient
from billing.sources import ClientKey
from core.database import db


class RoundClients:
    """The tallies of the clients a round holds, by source key, and the sources it found without a client."""

    def __init__(self, store: AggregationStore, now: dt.datetime, *, skip_locked: bool, max_clients: int | None):
        self.store = store
        self.now = now
        self.skip_locked = skip_locked
        self.max_clients = max_clients
        self.by_key: dict[ClientKey, ClientTally] = {}
        self.clientless: set[ClientKey] = set()  # sources this round looked up and found no live client of

    def adopt(self, client: RebillClient) -> None:
        """Aggregate for a client the caller already locked."""
        db.session.flush()
        tally = ClientTally(client, self.store)
        self.by_key[tally.key] = tally
        give_cap_room([tally], self.now)

    def lock(self, keys: set[ClientKey]) -> tuple[set[ClientKey], set[ClientKey]]:
        """Lock the live clients of these keys the round has room for (skipping ones locked elsewhere).

        Returns every live key, and the keys left for a later round: clients beyond ``max_clients``, or, once
        the round is full, every key it does not hold (not even looked up). Clients are locked in id order.
        """
        unknown = [key for key in keys if key not in self.by_key]
        if not unknown:
            return set(), set()
        room = None if self.max_clients is None else self.max_clients - len(self.by_key)
        postponed: set[ClientKey] = set()
        if room is not None and room <= 0:
            # Full: keys not looked up wait for the next round, but sources this round already found without
            # a client are looked up again (their events are unmapped unless one gained a client meanwhile), so
            # the next round does not read their events again.
            postponed = {key for key in unknown if key not in self.clientless}
            unknown = [key for key in unknown if key in self.clientless]
            if not unknown:
                return set(), postponed
        found = self.store.find_live_clients(unknown)
        live = {(client.agency_id, client.provider, client.source_key) for client in found}
        if self.max_clients is None or len(self.clientless) < self.max_clients:  # bounded like the tallies
            self.clientless.update(key for key in unknown if key not in live)
        ids = sorted(client.id for client in found)
        taken = 0
        # Clients locked elsewhere take no room: the next ones in id order are tried until the round is full.
        while taken < len(ids) and (room is None or room > 0):
            chosen = ids[taken:] if room is None else ids[taken : taken + room]
            taken += len(chosen)
            for locked in self.store.lock_clients(chosen, skip_locked=self.skip_locked):
                tallies = [ClientTally(row, self.store) for row in locked]
                for tally in tallies:
                    self.by_key[tally.key] = tally
                give_cap_room(tallies, self.now)
                if room is not None:
                    room -= len(tallies)
        left = set(ids[taken:])
        postponed |= {(client.agency_id, client.provider, client.source_key) for client in found if client.id in left}
        return live, postponed
