"""Study storage: SQLite (the default, in the study folder) or PostgreSQL shared by several machines.

Workers on any number of machines keep ``--trials`` exact through the storage itself:

* a trial is claimed under a lock on the study (``study_lock``): stale trials are failed, the trials that count
  are counted, and ``study.ask()`` takes a waiting trial or creates one, all while no other worker can claim;
  on PostgreSQL the lock is a transaction-scoped advisory lock (``pg_advisory_xact_lock``, released by the
  server when the transaction ends or its connection dies); a SQLite file lives on one machine, and its lock is
  an ``flock`` on ``<database>.lock`` (released by the kernel when its process dies).
* every running trial records a heartbeat in the storage (Optuna's ``RDBStorage(heartbeat_interval=...)``); a
  trial whose worker died stops beating, is failed after the grace period by whichever worker claims next, and
  ``RetryHeartbeatStaleTrialCallback`` enqueues it again with the same parameters, so the study still reaches exactly
  ``--trials``.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

from ..errors import NewsloraError, first_line

HEARTBEAT_S = 30  # seconds between a running trial's heartbeats (--heartbeat)
GRACE_FACTOR = 3  # a trial is stale after GRACE_FACTOR heartbeats without one
MAX_RETRY = 3  # a trial whose worker keeps dying (e.g. out of memory) is retried at most this often
URL_HELP = "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


def storage_url(url: str) -> str:
    """The SQLAlchemy URL of a --storage value: ``postgresql://`` (or ``postgres://``) uses psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise NewsloraError(f"--storage {url!r} is not a database URL: {URL_HELP}")
    dialect = scheme.split("+")[0]
    if dialect in ("postgresql", "postgres"):
        return f"postgresql+{scheme.partition('+')[2] or 'psycopg'}://{rest}"
    if dialect == "sqlite":
        return url
    raise NewsloraError(f"--storage {shown(url)}: unsupported database {dialect!r}; {URL_HELP}")


def shown(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://")[0] + "://..."


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None: in memory, or not SQLite)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).resolve()


def open_storage(url: str, heartbeat: int | None = None):
    """An Optuna ``RDBStorage`` for ``url``; with ``heartbeat`` (seconds), running trials record heartbeats and stale
    ones are retried. One clear error for a missing driver or an unreachable server."""
    import optuna
    import sqlalchemy.exc

    url = storage_url(url)
    if url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    else:  # several processes on one file: wait for its lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 300}}
    kwargs = {}
    last = None
    for _ in range(3):  # workers starting together on a fresh database race to create Optuna's tables: retry
        try:
            with warnings.catch_warnings():  # the heartbeat is an "experimental" Optuna feature since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat is not None:
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                    kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": GRACE_FACTOR * int(heartbeat),
                              "heartbeat_stale_trial_callback": retry}
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError:  # SQLAlchemy could not import the URL's driver
            driver = url.split("://")[0].partition("+")[2]
            raise NewsloraError(f"the database driver {driver or 'for ' + shown(url)} is not installed: "
                                + ("pip install 'newslora[postgres]'" if driver == "psycopg" else
                                   f"install {driver}")) from None
        except sqlalchemy.exc.OperationalError as e:  # unreachable server, refused login, missing database
            raise NewsloraError(f"cannot open study storage {shown(url)}: {driver_message(e)}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e
        except sqlalchemy.exc.DatabaseError as e:  # e.g. sqlite:///notes.txt: "file is not a database"
            raise NewsloraError(f"cannot open study storage {shown(url)}: {driver_message(e)}; point --storage at a "
                                "study database or a new file") from None
    raise NewsloraError(f"cannot open study storage {shown(url)}: {driver_message(last)}")


def driver_message(e: BaseException) -> str:
    """The first line of a database error: the driver's own exception (SQLAlchemy wraps it as ``orig``)."""
    return first_line(getattr(e, "orig", None) or e, None)


@contextlib.contextmanager
def study_lock(storage, study_name: str):
    """Only one worker, on any machine, inside this block at a time for the study ``study_name``."""
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        from sqlalchemy import text

        key = int.from_bytes(hashlib.blake2b(f"newslora-search:{study_name}".encode(), digest_size=8).digest(),
                             "big", signed=True)
        with engine.begin() as conn:  # the lock ends with this transaction
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield
        return
    path = sqlite_path(str(engine.url))
    if path is None:  # an in-memory database belongs to one process
        yield
        return
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
