"""gunicorn settings read from the working directory (gunicorn's default ``./gunicorn.conf.py``); the
Procfile's command line sets the rest: gthread workers, 2 x 16 threads. Threads, not sync workers: GHL's
message webhooks arriving together in one worker share one database commit (ghl.message_ingest), which a
sync worker, serving one request at a time, cannot do; and a slow portal request then does not stop webhook
intake. 16 rather than 4: a message webhook's thread mostly waits for its batch's WAL flush, so the more
deliveries a worker holds at once, the more share each commit, and the less CPU each costs (worker and
PostgreSQL, ~1.0-1.3 ms at 4 threads, ~0.7-0.8 ms at 16, bench/README.md). A request that needs the
SQLAlchemy pool (5 + 10 overflow connections per worker) may wait for one when all 16 threads hold one.

The access log names the path without its query string and drops the Referer: ``GET /oauth/callback?code=``
carries GHL's single-use authorization code, and query strings elsewhere may hold search terms.
"""

access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(M)sms'
