"""gunicorn settings read from the working directory (gunicorn's default ``./gunicorn.conf.py``); the
Procfile's command line sets the rest.

The access log names the path without its query string and drops the Referer: ``GET /oauth/callback?code=``
carries GHL's single-use authorization code, and query strings elsewhere may hold search terms.
"""

access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(M)sms'
