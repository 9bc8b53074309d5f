"""A throwaway PostgreSQL server on 127.0.0.1 (a free port, a temporary data folder) for the search tests and
``bench/search_exact.py``.

PostgreSQL refuses to run as root: as root, ``initdb`` and the server run as the ``postgres`` user (``runuser``),
in a folder that user owns. The binaries are looked up on PATH, then in ``/usr/lib/postgresql/<version>/bin``
(Debian's ``apt-get install postgresql``, which ``.ci/run`` does where they are missing).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresMissing(RuntimeError):
    pass


def find_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if versions:
        return versions[-1]
    raise PostgresMissing(f"PostgreSQL's {name} is not on PATH nor in /usr/lib/postgresql/*/bin: install the server "
                          "(apt-get install -y postgresql; .ci/run does this)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer() as pg: pg.url`` -> ``postgresql://newslora@127.0.0.1:PORT/postgres`` (trust login)."""

    def __init__(self):
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        self.root = Path(tempfile.mkdtemp(prefix="newslora-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = None
        self._as = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresMissing("no 'postgres' user to run the server as (running as root): install the "
                                      "server with apt-get install -y postgresql, which creates it") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        res = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if res.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({res.returncode}): {res.stderr.strip()[-2000:]}\n{log}")

    def start(self) -> "PostgresServer":
        self._run(self.initdb, "-D", str(self.data), "-U", "newslora", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    @property
    def url(self) -> str:
        return f"postgresql://newslora@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
