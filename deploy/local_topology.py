"""The production topology as plain processes on this machine: nginx → two gunicorn → PostgreSQL, two schedulers.

    deploy/run-local [--port 8080] [--database-url postgresql://…] [--dir /tmp/rebill-local]

Steps: create the database if missing, run the release step (migrations), start web-1 and web-2 (gunicorn
with the Procfile's web options on 127.0.0.1:PORT+1 and +2), scheduler-1 and scheduler-2 (`rebill
scheduler`), and nginx on PORT from deploy/nginx.conf.template; wait until /healthz answers through nginx,
then keep running until Ctrl-C (SIGTERM to everything). Each process runs in its own process group, so
``kill`` can SIGKILL a gunicorn master and its workers at once (bench/soak.py does, and restarts them).

Settings come from the environment like any Rebill process; for what production requires and is unset
here (SECRET_KEY, REBILL_ENCRYPTION_KEYS, REBILL_METRICS_TOKEN) values are generated once and kept in
``--dir``. All processes share one PROMETHEUS_MULTIPROC_DIR (emptied at start): one scrape of /metrics
through nginx shows the web workers and the schedulers. Logs: ``--dir``/logs/<process>.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STARTUP_SECONDS = 60


@dataclass
class Topology:
    """Start, kill, restart and stop the local production topology."""

    run_dir: Path
    database_url: str
    port: int = 8080
    extra_env: dict[str, str] = field(default_factory=dict)
    web_instances: int = 2
    schedulers: int = 2
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def web_port(self, name: str) -> int:
        return self.port + int(name.rsplit("-", 1)[1])

    @property
    def names(self) -> list[str]:
        webs = [f"web-{n}" for n in range(1, self.web_instances + 1)]
        return [*webs, *(f"scheduler-{n}" for n in range(1, self.schedulers + 1)), "nginx"]

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare the run directory and database, migrate, start every process, wait for /healthz via nginx."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "prometheus"
        shutil.rmtree(metrics, ignore_errors=True)  # values of processes from an earlier run are not ours
        metrics.mkdir()
        self.env = self._environment(metrics)
        create_database(self.database_url)
        self.release()
        self._render_nginx_conf()
        for name in self.names:
            self.restart(name)
        self.wait_healthy()

    def release(self) -> None:
        """The release step: apply migrations (Procfile's release line)."""
        subprocess.run([PYTHON, "-m", "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    def restart(self, name: str) -> subprocess.Popen:
        """Start (or start again) one process by name; returns it once started (not necessarily serving yet)."""
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running")
        log = (self.run_dir / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(self._command(name), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        log.close()
        self.processes[name] = process
        if name.startswith("web-"):
            wait_for(f"http://127.0.0.1:{self.web_port(name)}/healthz", process, name)
        return process

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything in its process group (a gunicorn master and its workers)."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left after 20 s."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def wait_healthy(self) -> None:
        wait_for(f"{self.url}/healthz", self.processes["nginx"], "nginx")

    # ---- pieces -------------------------------------------------------------------------------------------

    def _environment(self, metrics: Path) -> dict[str, str]:
        secrets_file = self.run_dir / "secrets.json"
        if secrets_file.exists():
            kept = json.loads(secrets_file.read_text())
        else:
            from cryptography.fernet import Fernet

            kept = {
                "SECRET_KEY": secrets.token_urlsafe(32),
                "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                "REBILL_METRICS_TOKEN": secrets.token_urlsafe(24),
            }
            secrets_file.write_text(json.dumps(kept))
            secrets_file.chmod(0o600)
        env = {"REBILL_ENV": "production", **kept, **{k: v for k, v in os.environ.items() if v}}
        env |= {
            "DATABASE_URL": self.database_url,
            "REBILL_TRUSTED_PROXIES": "1",  # nginx
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            **self.extra_env,
        }
        return env

    def _command(self, name: str) -> list[str]:
        if name.startswith("web-"):
            bind = f"127.0.0.1:{self.web_port(name)}"
            return [PYTHON, "-m", "gunicorn", *procfile_gunicorn_options(), "--bind", bind, "app:create_app()"]
        if name.startswith("scheduler-"):
            return [PYTHON, "-m", "flask", "--app", "app", "rebill", "scheduler"]
        if name == "nginx":
            return [nginx_binary(), "-c", str(self.run_dir / "nginx.conf"), "-p", str(self.run_dir), "-g",
                    "daemon off;"]  # fmt: skip
        raise ValueError(f"unknown process {name}")

    def _render_nginx_conf(self) -> None:
        nginx_dir = self.run_dir / "nginx"
        nginx_dir.mkdir(exist_ok=True)
        upstreams = " ".join(
            f"server 127.0.0.1:{self.web_port(name)} max_fails=1 fail_timeout=3s;"
            for name in self.names
            if name.startswith("web-")
        )
        conf = render_nginx_conf(
            listen=f"127.0.0.1:{self.port}", upstream_servers=upstreams, run_dir=nginx_dir, worker_processes=1
        )
        (self.run_dir / "nginx.conf").write_text(conf)


def render_nginx_conf(*, listen: str, upstream_servers: str, run_dir: Path, worker_processes: int = 1) -> str:
    """deploy/nginx.conf.template with its ${VARIABLES} filled in (nginx's own $variables untouched)."""
    template = string.Template((ROOT / "deploy" / "nginx.conf.template").read_text())
    return template.safe_substitute(
        REBILL_LISTEN=listen,
        REBILL_UPSTREAM_SERVERS=upstream_servers,
        NGINX_RUN_DIR=str(run_dir),
        NGINX_WORKER_PROCESSES=str(worker_processes),
    )


def nginx_binary() -> str:
    """Debian's nginx (apt-get install nginx), found on PATH or in /usr/sbin."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    return found


def procfile_gunicorn_options() -> list[str]:
    """The gunicorn options of the Procfile's web line, without its bind and app target."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    words = shlex.split(line.removeprefix("web:"))
    options, skip = [], False
    for word in words[1:-1]:  # gunicorn ... target
        if skip:
            skip = False
        elif word in ("--bind", "-b"):
            skip = True
        else:
            options.append(word)
    return options


def create_database(database_url: str) -> None:
    """Create the PostgreSQL database named in the URL if it does not exist (via the `postgres` database)."""
    import psycopg

    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    base, name = plain.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            admin.execute(f'CREATE DATABASE "{name}"')


def wait_for(url: str, process: subprocess.Popen, name: str, seconds: float = STARTUP_SECONDS) -> None:
    """Poll ``url`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not answer {url} within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="nginx's port; gunicorn takes the next two")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/rebill_local"),
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/rebill-local"), help="run directory (logs, conf)")
    args = parser.parse_args()
    topology = Topology(run_dir=args.dir, database_url=args.database_url, port=args.port)
    try:
        topology.start()
        print(f"Rebill: {topology.url}  (nginx → web-1 :{args.port + 1}, web-2 :{args.port + 2}; 2 schedulers)")
        print(f"metrics: curl -H 'Authorization: Bearer {topology.env['REBILL_METRICS_TOKEN']}' {topology.url}/metrics")
        print(f"logs: {args.dir}/logs/   Ctrl-C stops everything")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        reported = set()
        while True:  # no restarts here (a supervisor's job: systemd, compose); say what died
            time.sleep(1)
            for name, process in topology.processes.items():
                if process.poll() is not None and name not in reported:
                    reported.add(name)
                    print(f"{name} exited with {process.returncode}; see {args.dir}/logs/{name}.log")
    except KeyboardInterrupt:
        pass
    finally:
        topology.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
