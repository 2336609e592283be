"""Slow clients against gunicorn alone and behind deploy/'s nginx: does /healthz still answer?

    .venv/bin/python bench/slow_clients.py [--slow 64] [--port 18580]

Starts gunicorn with the Procfile's web options (today 2 gevent workers x 256 connections) on a throwaway
SQLite database and nginx from deploy/nginx.conf.template in front of it. For each of "gunicorn directly"
and "through nginx": opens --slow connections that send the start of a request's headers and then nothing,
then asks /healthz five times (3 s timeout each) and prints what came back and how long it took. The
suite's test (tests/deploy/test_nginx.py) checks the nginx half; this shows the other half too.

With gevent workers, gunicorn drops a connection whose headers take longer than its keep-alive (2 s), so
these headers-only clients hold its 512 connections for 2 s at most, and the default 64 no longer stop
/healthz on gunicorn alone; a client that sends its headers and never finishes its body holds one for good
(more than 512 of those did stop it, measured once by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "deploy")]

from local_topology import nginx_binary, procfile_gunicorn_options, render_nginx_conf, wait_for  # noqa: E402

PARTIAL_REQUEST = b"POST /webhooks/ghl HTTP/1.1\r\nHost: rebill.test\r\nContent-Type: application/json\r\n"


def probe(url: str, tries: int = 5) -> list[str]:
    outcomes = []
    for _ in range(tries):
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=3) as answer:
                outcomes.append(f"{answer.status} in {(time.perf_counter() - started) * 1000:.0f} ms")
        except OSError as error:
            outcomes.append(f"{type(error).__name__} after {time.perf_counter() - started:.1f} s")
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=64, help="connections that never finish their headers")
    parser.add_argument("--port", type=int, default=18580, help="gunicorn; nginx takes the next port")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rebill-slow-"))
    env = {**os.environ, "REBILL_ENV": "development", "DATABASE_URL": f"sqlite:///{workdir / 'rebill.sqlite3'}",
           "REBILL_TRUSTED_PROXIES": "1", "REBILL_LOG_LEVEL": "ERROR"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *procfile_gunicorn_options(), "--bind", f"127.0.0.1:{args.port}",
         "--access-logfile", "/dev/null", "app:create_app()"], cwd=ROOT, env=env,
    )  # fmt: skip
    (workdir / "nginx").mkdir()
    conf = workdir / "nginx.conf"
    conf.write_text(render_nginx_conf(listen=f"127.0.0.1:{args.port + 1}",
                                      upstream_servers=f"server 127.0.0.1:{args.port};", run_dir=workdir / "nginx"))
    nginx = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])
    try:
        wait_for(f"http://127.0.0.1:{args.port}/healthz", gunicorn, "gunicorn")
        wait_for(f"http://127.0.0.1:{args.port + 1}/healthz", nginx, "nginx")
        print(f"gunicorn {' '.join(procfile_gunicorn_options())}; load average {os.getloadavg()[0]:.1f}")
        for name, port in (("gunicorn directly", args.port), ("through nginx", args.port + 1)):
            slow = []
            for _ in range(args.slow):
                connection = socket.create_connection(("127.0.0.1", port))
                connection.sendall(PARTIAL_REQUEST)
                slow.append(connection)
            time.sleep(0.5)  # let the server take them up
            print(f"{name}, {args.slow} slow clients: /healthz " + "; ".join(probe(f"http://127.0.0.1:{port}")))
            for connection in slow:
                with contextlib.suppress(OSError):
                    connection.close()
            time.sleep(1)  # the slots free up
    finally:
        for process in (nginx, gunicorn):
            process.send_signal(signal.SIGQUIT)
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
