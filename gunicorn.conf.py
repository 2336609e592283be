"""gunicorn settings read from the working directory (gunicorn's default ``./gunicorn.conf.py``); the
Procfile's command line sets the rest: gthread workers, 2 x 4 threads. Threads, not sync workers: GHL's
message webhooks arriving together in one worker share one database commit (ghl.message_ingest), which a
sync worker, serving one request at a time, cannot do; and a slow portal request then does not stop webhook
intake. bench/README.md has the measurements behind 4 threads.

The access log names the path without its query string and drops the Referer: ``GET /oauth/callback?code=``
carries GHL's single-use authorization code, and query strings elsewhere may hold search terms.
"""

access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(M)sms'
