"""deploy/'s nginx in front of gunicorn: clients that never finish their request do not stop /healthz.

gunicorn with the Procfile's gevent workers serves at most workers x worker-connections (2 x 256) connections
at once. It drops a connection whose headers take longer than its keep-alive (2 s), but one that sent its
headers and never finishes its body holds its place for good: more such clients than places and /healthz
times out. nginx reads each request whole first, so gunicorn never sees them. The test opens more slow
clients than gunicorn has places (read from the Procfile), from several loopback addresses as real clients
would come (nginx lets one address hold at most 512 connections). Runs Debian's nginx as a plain process;
skipped when nginx is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gunicorn.util import load_class
from gunicorn.workers.ggevent import GeventWorker

from tests.conftest import TEST_ENCRYPTION_KEY, TEST_SECRET_KEY

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "deploy"))
from local_topology import nginx_binary, procfile_gunicorn_options, render_nginx_conf, wait_for  # noqa: E402


def gunicorn_places(options: list[str]) -> int:
    """Connections the Procfile's gunicorn serves at once: workers x (gevent) worker-connections or threads."""
    value = {name: options[i + 1] for i, name in enumerate(options[:-1]) if name.startswith("--")}
    if issubclass(load_class(value.get("--worker-class", "sync")), GeventWorker):  # gunicorn's or ours
        per_worker = value.get("--worker-connections", "1000")  # gunicorn's default
    else:
        per_worker = value.get("--threads", "1")
    return int(value.get("--workers", "1")) * int(per_worker)


SLOW_CLIENTS = gunicorn_places(procfile_gunicorn_options()) + 64
SLOW_CLIENT_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 6)]  # each below nginx's 512 per address


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, sqlite_template):
    """gunicorn on a migrated SQLite copy, and nginx from deploy/nginx.conf.template in front; yields nginx's URL."""
    try:
        nginx = nginx_binary()
    except RuntimeError:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    tmp_path = tmp_path_factory.mktemp("proxied")
    database = tmp_path / "rebill.sqlite3"
    shutil.copy(sqlite_template, database)
    web_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "REBILL_ENV": "test", "DATABASE_URL": f"sqlite:///{database}", "REBILL_TRUSTED_PROXIES": "1",
           "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY, "SECRET_KEY": TEST_SECRET_KEY,
           "REBILL_LOG_LEVEL": "ERROR"}  # fmt: skip
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *procfile_gunicorn_options(), "--bind", f"127.0.0.1:{web_port}",
         "--access-logfile", str(tmp_path / "access.log"), "--access-logformat", "%({x-forwarded-for}i)s %(U)s",
         "app:create_app()"],
        cwd=REPO, env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    (tmp_path / "nginx").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(
        listen=f"127.0.0.1:{proxy_port}", upstream_servers=f"server 127.0.0.1:{web_port};", run_dir=tmp_path / "nginx"
    ))  # fmt: skip
    proxy = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{web_port}/healthz", gunicorn, "gunicorn")
        wait_for(f"http://127.0.0.1:{proxy_port}/healthz", proxy, "nginx")
        yield f"http://127.0.0.1:{proxy_port}", proxy_port, tmp_path / "access.log"
    finally:
        for process in (proxy, gunicorn):
            process.send_signal(signal.SIGQUIT)  # both: quick shutdown (SIGTERM would wait for keep-alive clients)
            process.wait(30)


def open_slow_clients(port: int, request_start: bytes) -> list[socket.socket]:
    """Connections that send the start of a request and then nothing."""
    clients = []
    for number in range(SLOW_CLIENTS):
        source = (SLOW_CLIENT_ADDRESSES[number % len(SLOW_CLIENT_ADDRESSES)], 0)
        client = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source)
        client.sendall(request_start)
        clients.append(client)
    return clients


@pytest.mark.parametrize(
    "request_start",
    [
        b"POST /webhooks/ghl HTTP/1.1\r\nHost: rebill.test\r\nContent-Type: application/json\r\n",  # no blank line
        b"POST /webhooks/ghl HTTP/1.1\r\nHost: rebill.test\r\nContent-Length: 4096\r\n\r\n{\"type\":",  # short body
    ],
    ids=["headers", "body"],
)
def test_slow_clients_do_not_stop_healthz_behind_the_proxy(proxied, request_start):
    url, port, _ = proxied
    clients = open_slow_clients(port, request_start)
    try:
        for _ in range(40):  # each answered while more slow clients than gunicorn has places hang on
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                assert answer.status == 200
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.close()


def test_the_proxy_appends_the_client_address_it_saw_to_x_forwarded_for(proxied):
    url, _, access_log = proxied
    request = urllib.request.Request(f"{url}/healthz", headers={"X-Forwarded-For": "203.0.113.9"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200
    # The app trusts one proxy (REBILL_TRUSTED_PROXIES=1): the last entry, the address nginx saw.
    lines = access_log_lines(access_log, containing="203.0.113.9")
    assert any('"203.0.113.9, 127.0.0.1 /healthz"' in line for line in lines), lines


def access_log_lines(path: Path, containing: str) -> list[str]:
    """gunicorn's access log once a line ``containing`` is in it (it is written just after the answer is sent)."""
    deadline = time.monotonic() + 10
    while True:
        lines = path.read_text().splitlines()
        if any(containing in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)
