"""gunicorn settings read from the working directory (gunicorn's default ``./gunicorn.conf.py``); the
Procfile's command line sets the rest: 2 gevent workers, each serving up to 256 connections at once. The
worker class is gunicorn's gevent worker with new connections shared evenly between the workers
(core.gunicorn_worker, whose docstring says why and how).

Why gevent. A worker runs each request in a greenlet, and every wait (a socket read or write, a PostgreSQL
round trip: psycopg 3 waits cooperatively once gevent has patched ``select``, see ``post_worker_init``)
switches to another greenlet inside the one thread. GHL's message webhooks arriving together in one worker
share one database commit (ghl.message_ingest, core.group_commit): a caller waiting for its batch's WAL
flush is a greenlet switch there, not a futex wake-up and a GIL hand-off as with threads: measured with
bench/webhook_bench.py, a worker's CPU per webhook fell from ~0.64-0.72 ms (gthread, 2 x 16 threads) to
~0.46-0.49 ms (bench/README.md, third pass; ~0.41-0.45 ms after the fourth). A portal request waiting on
Stripe or GHL yields instead of holding one of a few threads, and a slow client holds a greenlet, not a
thread. Not sync workers: they serve one request at a time, so nothing would share a commit.

Why 256 connections per worker (``--worker-connections``). A batch holds at most 64 deliveries and one batch
is in flight per worker (ghl.message_ingest MAX_ROWS, MAX_WRITERS), so 256 lets a full batch be written while
three more gather behind it, a burst of GHL deliveries then costing a few statements; more would only
lengthen the queue (each request waits for the batches ahead of its own). Message webhooks use the ingest's
own connection per worker, not the SQLAlchemy pool; every other request that touches the database
waits for one of the pool's 5 + 10 overflow connections per worker (up to SQLAlchemy's 30 s pool timeout,
then answers 503), and more greenlets than connections just queue there. Memory: a greenlet costs KiBs, a
request holds its body (at most 8 MiB, MAX_CONTENT_LENGTH), so the body cap times 256 bounds a worker's
request buffers; real webhooks are a few KiB.

The one real risk: a greenlet is never preempted. Python CPU between two waits runs alone, and a long
CPU-bound request stalls every other request of its worker, webhooks included (GHL redelivers only after a
429; a webhook whose answer never comes in time is lost). What bounds the heavy requests (README.md,
Deploying):
- ``POST /api/v1/usage``: a valid key first, then at most 4 MiB, at most 711,002 of the bytes ``[``, ``{``
  and ``,`` (counted before parsing, ~4 ms: the most 1000 valid events can hold, capri.validation) and 1000
  events; json.loads runs with the cyclic GC paused. A normal 1000-event batch parses and checks in a few
  ms. Millions of tiny nested arrays (~1.1 s of parsing, most of it the GC; a webhook waited 1.4 s behind
  one such body, up to 4 s behind four) are refused before parsing. The worst body left, one object of
  ~466,000 distinct keys, is ~0.35-0.45 s of parsing and ~0.1 s of checking in one slice: a webhook of its
  worker waited 0.5 s behind one, 0.6-1.3 s behind four sent at once (they run one after another; nothing
  limits how many a key sends at once). Measured under this configuration on a 2-core machine.
- the CSV export (``/api/portal/clients/<id>/export.csv``): at most 366 days, streamed 1000 rows per fetch
  from a server-side cursor on PostgreSQL, so it yields at every fetch and whenever the client reads slower
  than it writes; on SQLite (one process, development) nothing in it yields.
- the money view, statements, client lists and unmapped usage: sums in SQL, then Python work per client (per
  unmapped channel) of the agency, with a database round trip (a yield) per query; bounded by the agency's
  size, not by the request.
- ``POST /webhooks/ghl``: the signature is checked over the raw body (at most 8 MiB, ~10 ms) before anything
  is parsed.

The access log names the path without its query string and drops the Referer: ``GET /oauth/callback?code=``
carries GHL's single-use authorization code, and query strings elsewhere may hold search terms.
"""

import sys

access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(M)sms'


def post_worker_init(worker):
    """Refuse to serve from a gevent worker whose PostgreSQL waits would block the whole worker.

    psycopg picks its wait function once, when ``psycopg.waiting`` is first imported: a cooperative one if
    gevent has patched ``select`` by then, else its C wait, which blocks the worker's one thread (and every
    greenlet in it) for each round trip. gunicorn patches in the worker before it loads the app, so this holds
    unless psycopg was imported earlier (``--preload``, or an import added to this file); then the worker
    fails to boot (gunicorn stops) rather than serve one query at a time.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return  # not a gevent worker
    import psycopg.waiting

    if psycopg.waiting.wait is getattr(psycopg.waiting, "wait_c", None):
        raise RuntimeError(
            "psycopg was imported before gevent patched the worker (--preload, or an import in gunicorn.conf.py?): "
            "its waits would block every request of the worker"
        )
