"""What every command does before its work: settings, the database, the broker, the drivers.

The start-up checks live here, once, for the command line and for the worker processes
``bindpipe worker --concurrency N`` spawns:

* :func:`load_settings`: the environment (and ``BINDPIPE_CONFIG_FILE``), with unknown
  ``BINDPIPE_*`` variables refused;
* :func:`check_drivers`: the mechanism drivers load, as neutron-server refuses to start otherwise;
* :func:`database`: the database exists and its schema is at head; it creates nothing, except the
  embedded default's schema for the commands that run the whole pipeline in one process;
* :func:`check_broker`: the broker takes our login, and the queues the stages need exist
  (declared first when ``declare_topology`` is on).

A worker waits for a broker or database it cannot reach yet (:func:`patiently`), as it does when
they restart under it; what waiting cannot cure (a missing schema or queue, an unknown driver, a
refused login) stops it before it consumes anything.

:func:`describe_failure` is the one mapping from an exception to what an operator reads: one
line and an exit code (2: configuration or usage; 3: a service that cannot be reached). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import structlog
from amqp import exceptions as amqp_errors
from kombu import Connection
from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy import Engine, create_engine
from sqlalchemy import exc as sql_errors
from sqlalchemy.engine import make_url

from pipeline.observability.logging import configure_logging, redact_text
from pipeline.observability import metrics
from pipeline.settings import CONFIG_FILE_ENV, NESTED, PREFIX, Settings, unknown_variables
from pipeline.stages.errors import ConfigError

log = structlog.get_logger(__name__)
T = TypeVar("T")

EMBEDDED_DATABASE = "sqlite:///bindpipe.sqlite"
BROKER_TIMEOUT = 5.0  # seconds to connect: a broker that answers does so at once
MAX_WAIT = 15.0  # the longest pause between two attempts of a worker waiting for a service


class OperatorError(Exception):
    """A problem an operator fixes or waits out: ``str()`` is one line naming it and the fix."""

    exit_code = 1


class ConfigurationError(OperatorError):
    """Configuration or usage: exit 2."""

    exit_code = 2


class LoginRefused(ConfigurationError):
    """The broker or database refused our user or password, whatever the command was doing."""


class ServiceUnavailable(OperatorError):
    """The broker or the database cannot be reached: exit 3."""

    exit_code = 3


# --- settings ---------------------------------------------------------------------------------------


def _variable(location: tuple[int | str, ...]) -> str:
    return PREFIX + NESTED.join(str(part) for part in location).upper()


def load_settings() -> Settings:
    """The settings, and the process's logging and metrics directory configured from them."""
    unknown = unknown_variables()
    if unknown:
        raise ConfigurationError(f"unknown variable(s) {', '.join(unknown)}: no setting has that name "
                                 "(pipeline/settings.py lists them); correct or unset it")
    path = os.environ.get(CONFIG_FILE_ENV)
    if path and not Path(path).is_file():
        raise ConfigurationError(f"{CONFIG_FILE_ENV}={path}: no such file; correct or unset it")
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{_variable(e['loc'])}={str(e.get('input'))[:80]!r}: {e['msg']}" if e["loc"]
                             else e["msg"] for e in exc.errors())  # no location: a check across settings
        raise ConfigurationError(f"bad configuration: {problems}") from None
    except SettingsError as exc:  # a value that should be JSON and is not
        raise ConfigurationError(f"bad configuration: {exc}; write lists as a,b or as JSON") from None
    configure_logging(settings.log_format)
    metrics.configure_metrics_dir(settings.metrics_dir)
    return settings


def check_drivers(settings: Settings) -> None:
    """Load the configured mechanism drivers once, as the select stage will."""
    from pipeline.stages.selection import MechanismManager

    try:
        MechanismManager(settings.driver_config())
    except ConfigError as exc:
        raise ConfigurationError(f"BINDPIPE_MECHANISM_DRIVERS: {exc.reason}; list known drivers, in order "
                                 "(e.g. openvswitch,sriovnicswitch)") from None


# --- the database -----------------------------------------------------------------------------------


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _missing_sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names when it does not exist (SQLite would create it, empty)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    return None if path.exists() else path.resolve()


def database(settings: Settings, create: bool = False) -> Engine:
    """An engine on the configured database, after checking that it can be used: it exists, it
    takes our login, and its schema is at head. ``create``: build the schema instead (the embedded
    default's SQLite file, for ``bindpipe demo`` and ``bindpipe run``)."""
    from pipeline import migrate
    from pipeline.db import create_schema, make_engine

    url = settings.database_url
    try:
        shown = _shown(url)
    except sql_errors.ArgumentError as exc:
        raise ConfigurationError(f"BINDPIPE_DATABASE_URL: {exc}") from None
    missing = None if create else _missing_sqlite_file(url)
    if missing is not None:
        default = " (the embedded default)" if url == EMBEDDED_DATABASE else ""
        raise ConfigurationError(
            f"no database at {missing}{default}: set BINDPIPE_DATABASE_URL to the one to use (`bindpipe demo` "
            "prints its own); `bindpipe run --events FILE` or `bindpipe migrate` create one")
    engine = make_engine(url)
    try:
        if create:
            create_schema(engine)
            return engine
        with _read_only(url, engine).connect() as connection:
            problem = migrate.schema_problem(connection)
    except sql_errors.SQLAlchemyError as exc:
        engine.dispose()
        failure = _database_failure(exc, shown)
        if failure is None:
            raise
        raise failure from None
    if problem:
        engine.dispose()
        raise ConfigurationError(f"{problem} ({shown}): run `bindpipe migrate` with this BINDPIPE_DATABASE_URL")
    return engine


def _read_only(url: str, engine: Engine) -> Engine:
    """An engine to look at the database without changing it: a SQLite file opened read-only (the
    run-time engine's first connection switches the file to WAL, writing its header); else ``engine``."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return engine
    location = f"file:{quote(str(Path(parsed.database).resolve()))}?mode=ro"
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(location, uri=True))


# A login or a name the server refuses is configuration; any other failure to connect, the network.
_DATABASE_REFUSALS = ("does not exist", "no pg_hba.conf entry", "unable to open database file",
                      "permission denied")


def _database_failure(exc: sql_errors.SQLAlchemyError, shown: str) -> OperatorError | None:
    """What a database error means to an operator; None for one that is not theirs (a bug)."""
    if isinstance(exc, (sql_errors.ArgumentError, sql_errors.NoSuchModuleError)):
        return ConfigurationError(f"BINDPIPE_DATABASE_URL: {exc}")
    if not isinstance(exc, sql_errors.DBAPIError):
        return None
    text = " ".join(str(exc.orig).split())
    lowered = f"{text} {type(exc.orig).__name__}".lower()
    if any(marker in lowered for marker in ("no such table", "undefinedtable")) or (
            "relation" in lowered and "does not exist" in lowered):
        return ConfigurationError(f"the database has no schema ({text}; {shown}): run `bindpipe migrate`")
    if not isinstance(exc, (sql_errors.OperationalError, sql_errors.InterfaceError)):
        return None
    if "authentication failed" in lowered:
        return LoginRefused(f"the database refused the login: {text} ({shown}); check the user and password in "
                            "BINDPIPE_DATABASE_URL")
    if any(marker in lowered for marker in _DATABASE_REFUSALS):
        return ConfigurationError(f"the database refused us: {text} ({shown}); check BINDPIPE_DATABASE_URL")
    return ServiceUnavailable(f"cannot reach the database: {text} ({shown}); is it running, and is "
                              "BINDPIPE_DATABASE_URL right?")


# --- the broker -------------------------------------------------------------------------------------


@contextmanager
def _broker_failures(shown: str) -> Iterator[None]:
    """Broker errors raised inside, as what they mean to an operator (others as they are)."""
    try:
        yield
    except OperatorError:
        raise
    except Exception as exc:
        failure = _broker_failure(exc, shown)
        if failure is None:
            raise
        raise failure from None


def broker_connection(settings: Settings) -> Connection:
    """A connection to the configured broker, made now (one attempt of ``BROKER_TIMEOUT`` s)."""
    connection = Connection(settings.broker_url, connect_timeout=BROKER_TIMEOUT, heartbeat=0,
                            ssl=settings.broker_ssl_options())
    try:
        with _broker_failures(connection.as_uri()):
            connection.connect()
    except BaseException:
        connection.release()
        raise
    return connection


def check_broker(settings: Settings, stages: tuple[str, ...] | list[str]) -> None:
    """The broker takes our login, and every queue of the pipeline exists: ``stages`` consume from
    theirs and hand on to the next ones, whose queue must be there to receive. With
    ``declare_topology`` the topology is declared first (configure permission needed)."""
    from pipeline.workers.topology import STAGES, dead_letter_queue, declare_topology, stage_queue

    with broker_connection(settings) as connection, _broker_failures(connection.as_uri()):
        if settings.declare_topology:
            try:
                declare_topology(connection, settings)
            except amqp_errors.AccessRefused as exc:
                raise ConfigurationError(
                    f"the broker at {connection.as_uri()} refused to declare the topology: {exc.reply_text}; a "
                    "least-privilege worker user only checks it: set BINDPIPE_DECLARE_TOPOLOGY=false") from None
            return
        missing = []
        for stage in STAGES:
            for queue in (stage_queue(stage, settings), dead_letter_queue(stage, settings)):
                channel = connection.channel()  # a passive declare that fails closes its channel
                try:
                    queue(channel).queue_declare(passive=True)
                except amqp_errors.NotFound:
                    missing.append(queue.name)
                finally:
                    if channel.is_open:
                        channel.close()
        if missing:
            ours = [name for name in missing if name in {stage_queue(stage, settings).name for stage in stages}]
            raise ConfigurationError(
                f"queue(s) {', '.join(missing)} do not exist on {connection.as_uri()}"
                f"{' (this worker consumes ' + ', '.join(ours) + ')' if ours else ''}: apply "
                "deploy/rabbitmq/definitions.json, or run `bindpipe declare` as an administrator")


# AMQP reply codes that configuration explains: ACCESS_REFUSED, NOT_FOUND, RESOURCE_LOCKED,
# PRECONDITION_FAILED (a queue's arguments), NOT_ALLOWED (the vhost).
_BROKER_CONFIGURATION = frozenset({403, 404, 405, 406, 530})


def _broker_failure(exc: BaseException, shown: str | None = None) -> OperatorError | None:
    at = f" at {shown}" if shown else ""
    for error in _chain(exc):
        if isinstance(error, amqp_errors.AMQPError) and error.code in _BROKER_CONFIGURATION:
            reply = error.reply_text or str(error)
            if "Login was refused" in reply:
                return LoginRefused(f"the broker{at} refused the login: {reply}; check the user and "
                                          "password in BINDPIPE_BROKER_URL")
            if error.code == 403:
                return ConfigurationError(f"the broker{at} refused: {reply}; use a broker user allowed to do this "
                                          "(deploy/README.md, 'Who may do what'; events are published by "
                                          "bindpipe-publisher)")
            if error.code == 406:
                return ConfigurationError(f"the broker{at} refused: {reply}; the queue exists with other arguments "
                                          "than BINDPIPE_QUEUE_TYPE / BINDPIPE_DELIVERY_LIMIT give")
            return ConfigurationError(f"the broker{at} refused: {reply}; apply deploy/rabbitmq/definitions.json "
                                      "(or `bindpipe declare` as an administrator), and check the vhost in "
                                      "BINDPIPE_BROKER_URL")
        # any socket error of a broker call: a node restarting also closes mid-handshake, or fails setsockopt
        if isinstance(error, (OSError, amqp_errors.RecoverableConnectionError, amqp_errors.ConnectionForced)):
            why = error.strerror if isinstance(error, OSError) and error.strerror else str(error) or type(error).__name__
            return ServiceUnavailable(f"cannot reach the broker{at}: {why}; is it running, and is BINDPIPE_BROKER_URL "
                                      "right?")
    return None


# --- failures, waiting ------------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (kombu wraps the socket's)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _raised_by_broker_client(exc: BaseException) -> bool:
    return any(f"{os.sep}kombu{os.sep}" in frame.filename or f"{os.sep}amqp{os.sep}" in frame.filename
               for frame in traceback.extract_tb(exc.__traceback__))


def describe_failure(exc: BaseException) -> OperatorError | None:
    """What ``exc`` means to an operator, or None when it is a bug (its traceback is wanted)."""
    for error in _chain(exc):
        if isinstance(error, OperatorError):
            return error
        if isinstance(error, ConfigError):
            return ConfigurationError(f"{error}; see BINDPIPE_MECHANISM_DRIVERS and BINDPIPE_ML2__*")
        if isinstance(error, sql_errors.SQLAlchemyError):
            return _database_failure(error, "BINDPIPE_DATABASE_URL")
    failure = _broker_failure(exc)
    # a refusal names itself; a lost connection is the broker's only when raised by its client
    if isinstance(failure, ConfigurationError) or failure is not None and any(
            _raised_by_broker_client(error) for error in _chain(exc)):
        return failure
    if isinstance(exc, OSError) and exc.filename is not None:  # a file named on the command line
        return ConfigurationError(f"{exc.strerror or exc}: {exc.filename}")
    return None


def one_line(failure: OperatorError) -> str:
    """The failure as printed: one line, passwords redacted."""
    return redact_text(" ".join(str(failure).split()))


def patiently(attempt: Callable[[], T], what: str, stopping: Callable[[], bool] = lambda: False) -> T:
    """``attempt()`` until it stops raising :class:`ServiceUnavailable` (a worker started before
    its broker or database is up waits for it, logging why); other failures are raised."""
    pause = 1.0
    while True:
        try:
            return attempt()
        except ServiceUnavailable as exc:
            if stopping():
                raise
            log.warning(f"waiting for the {what}", problem=one_line(exc), retry_in=pause)
            time.sleep(pause)
            pause = min(pause * 2, MAX_WAIT)


# --- workers ----------------------------------------------------------------------------------------


def prepare_worker(settings: Settings, stages: list[str], create: bool = False) -> Engine:
    """Every start-up check of a worker of ``stages``, before it consumes anything; its engine.
    ``create``: build the database's schema instead of checking it (``bindpipe run`` on SQLite).
    While it waits for a service, its readiness says which (``bindpipe health``)."""
    check_drivers(settings)
    metrics.worker_state(stages, broker=False, database=False, consuming=False)
    engine = patiently(lambda: database(settings, create=create), "database")
    metrics.worker_state(stages, database=True)
    if not settings.embedded:
        patiently(lambda: check_broker(settings, stages), "broker")
    return engine


def long_running(process: str) -> None:
    """For a process that runs until stopped: the traceback of every thread on SIGABRT (the
    watchdog's) or a fatal signal, and its build and process metrics."""
    faulthandler.enable()
    metrics.start_process_metrics(process)


def _stop_while_starting(*_: object) -> None:
    """SIGTERM before the worker consumes: nothing is in hand, so it leaves at once, with 0."""
    raise SystemExit(0)


def run_worker(stage: str, settings: Settings | None = None) -> None:
    """One worker process of ``stage`` (``bindpipe worker STAGE``, and each of ``--concurrency N``)."""
    from pipeline.workers.consumer import Worker

    settings = settings or load_settings()
    signal.signal(signal.SIGTERM, _stop_while_starting)  # the worker's own handler replaces it
    engine = prepare_worker(settings, [stage])
    long_running(f"worker-{stage}")
    Worker(settings, engine, [stage]).run_forever()
