"""ghl.ingest_connections: close() racing a writer's release under OS threads (no database needed).

close() retires every connection of an older generation, and _release keeps a connection only if no close()
retired it. _release checks the generation, then the connection's state, then appends it to the idle list: a
close() from another thread between the check and the append (a GIL switch; the engine's dispose, or another
writer's close after a dropped connection or a refused prepared statement) finds the idle list still empty,
and the retired connection is then appended and reused. Simulated deterministically: the connection's state
lookup, which _release makes after the generation check, is where the other thread's close() runs.
"""

from __future__ import annotations

from psycopg import pq

from ghl.ingest_connections import IngestConnections, _Own


class FakeConnection:
    def __init__(self, on_state_read):
        self.closed = False
        self._on_state_read = on_state_read

    @property
    def info(self):
        self._on_state_read()  # another thread runs close() here
        return type("Info", (), {"transaction_status": pq.TransactionStatus.IDLE})()

    def close(self) -> None:
        self.closed = True


def test_a_connection_released_while_another_thread_closes_the_ingest_is_not_kept():
    connections = IngestConnections(engine=None, store_timeout_ms=1000)
    connection = FakeConnection(on_state_read=connections.close)
    own = _Own(cursor=None, generation=connections._generation)
    own.proven = True
    connections._own[connection] = own
    connections._deadlines[connection] = float("inf")  # in use, watched, not cut

    connections._release(connection)

    assert connection not in connections._idle, "a connection retired by close() is back among the idle ones"
    assert connection.closed
