"""``bindpipe``: the one command-line entry point.

Every command reads its configuration from ``BINDPIPE_*`` environment variables (and the optional
``BINDPIPE_CONFIG_FILE``); see ``pipeline/settings.py``. Start-up checks and what a failure means
to an operator live in ``pipeline/runtime.py``: any command that fails for an operator's reason
prints one line and exits 2 (configuration or usage) or 3 (a service cannot be reached); the
traceback with ``--debug`` or ``BINDPIPE_DEBUG=1``.
"""

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException


class _Commands(TyperGroup):
    """Wraps every command, whoever wrote it: an operator's failure is one line and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # the command line's own: usage errors, exits
            raise
        except Exception as exc:
            from pipeline.runtime import describe_failure, one_line

            failure = describe_failure(exc)
            if failure is None:
                raise  # a bug: its traceback is the report
            if ctx.params.get("debug"):
                traceback.print_exc()
            typer.echo(f"bindpipe {ctx.invoked_subcommand}: {one_line(failure)}", err=True)
            raise typer.Exit(failure.exit_code) from None


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Port-binding control plane: ML2-compatible bindings with Nova-strict PCI accounting.")
replay_app = typer.Typer(no_args_is_help=True, help="Publish stored results or events again.")
app.add_typer(replay_app, name="replay")

STAGE_NAMES = ("validate", "select", "allocate", "compose")


def _version(value: bool) -> None:
    if not value:
        return
    from pipeline import __version__
    from pipeline.migrate import head
    from pipeline.models.binding import CONTRACT_VERSION

    typer.echo(f"bindpipe {__version__} (bus contract {CONTRACT_VERSION}, database schema {head()})")
    raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False,
         debug: Annotated[bool, typer.Option("--debug", envvar="BINDPIPE_DEBUG",
                                             help="print the traceback of a failure (or BINDPIPE_DEBUG=1)")] = False) -> None:
    """Port-binding control plane: ML2-compatible bindings with Nova-strict PCI accounting."""


def _settings():  # noqa: ANN202 - Settings, imported lazily to keep `--help` fast
    from pipeline.runtime import load_settings

    return load_settings()


def _engine(settings):  # noqa: ANN001, ANN202
    """The configured database, checked: it exists and its schema is at head (nothing is created)."""
    from pipeline.runtime import database

    return database(settings)


def _publisher(settings):  # noqa: ANN001, ANN202
    from kombu import Connection

    from pipeline.workers.publisher import connect_with_retry
    from pipeline.workers.signing import event_publisher

    connection = connect_with_retry(Connection(settings.broker_url, ssl=settings.broker_ssl_options()), 60)
    return event_publisher(connection, settings)


@contextmanager
def _broker_refusals(command: str, hint: str) -> Iterator[None]:
    """A broker's refusal (this user may not do that, a queue is missing) is an operator's mistake:
    one line and exit status 2, not a traceback."""
    from amqp.exceptions import AMQPError

    from pipeline.runtime import LoginRefused, describe_failure

    try:
        yield
    except AMQPError as exc:
        if isinstance(describe_failure(exc), LoginRefused):
            raise  # a wrong user or password, whatever the command: the command group says so
        typer.echo(f"bindpipe {command}: {exc} ({hint})", err=True)
        raise typer.Exit(2) from None


@app.command("dry-run")
def dry_run(path: str = typer.Argument(..., metavar="FILE|-", help="JSON list of scenarios, '-' for stdin")) -> None:
    """Bind each scenario's port offline (no broker, no database) and print the results as JSON."""
    from pipeline.dry_run import main_dry_run

    raise typer.Exit(main_dry_run(path))


@app.command("pci-dry-run")
def pci_dry_run(path: str = typer.Argument(..., metavar="FILE|-", help="JSON list of PCI scenarios, '-' for stdin")) -> None:
    """What-if for a host's PCI devices: run allocate/release sequences by Nova's rules, print every state."""
    from pipeline.pci_dry_run import main_pci_dry_run

    raise typer.Exit(main_pci_dry_run(path))


@app.command()
def worker(stage: Annotated[str, typer.Argument(help="validate, select, allocate or compose")],
           concurrency: Annotated[int, typer.Option(min=1, help="worker processes for this stage")] = 1) -> None:
    """Run one stage's worker (SIGTERM: finish the batch in hand, ack it, exit)."""
    if stage not in STAGE_NAMES:
        typer.echo(f"bindpipe worker: unknown stage {stage!r}; one of {', '.join(STAGE_NAMES)}", err=True)
        raise typer.Exit(2)
    from pipeline import runtime

    settings = _settings()
    if concurrency > 1:
        if settings.embedded:
            typer.echo("bindpipe worker: --concurrency needs a real broker (the in-memory one lives in one "
                       "process); use `bindpipe run`", err=True)
            raise typer.Exit(2)
        from pipeline.workers.processes import run_processes

        runtime.prepare_worker(settings, [stage]).dispose()  # fail here, once, not in N children
        raise typer.Exit(run_processes(runtime.run_worker, stage, concurrency))
    runtime.run_worker(stage, settings)


@app.command()
def run(relay_every: Annotated[float, typer.Option(help="seconds between outbox relay passes")] = 5.0,
        events: Annotated[str | None, typer.Option(metavar="FILE|-", help="envelopes to feed in (a JSON list or "
                                                   "one per line); run until done and print the results")] = None) -> None:
    """Run every stage (and the outbox relay) in this one process: the embedded default or a small site."""
    from pipeline import runtime
    from pipeline.workers.consumer import Worker
    from pipeline.workers.republish import Relay
    from pipeline.workers.topology import STAGES

    settings = _settings()
    # on SQLite (the embedded default) this command makes its own schema, as `bindpipe demo` does
    engine = runtime.prepare_worker(settings, list(STAGES), create=settings.database_url.startswith("sqlite"))
    if events is not None:
        from pipeline.demo import run_events

        raise typer.Exit(run_events(settings, engine, events))
    if settings.embedded:
        typer.echo("bindpipe run: the in-memory broker lives inside this process, so only --events can feed it; "
                   "set BINDPIPE_BROKER_URL to take events from RabbitMQ", err=True)
    the_worker = Worker(settings, engine, list(STAGES))
    the_worker.periodic.append(Relay(engine, lambda: the_worker.publisher, relay_every))
    runtime.long_running("run")
    the_worker.run_forever()


@app.command()
def relay(interval: Annotated[float, typer.Option(help="seconds between passes")] = 2.0,
          grace: Annotated[float, typer.Option(help="age before an unpublished result is relayed")] = 5.0,
          once: Annotated[bool, typer.Option(help="one pass, then exit")] = False) -> None:
    """Publish results that were committed but never confirmed as published (the outbox)."""
    from pipeline.workers.republish import run_relay

    from pipeline.runtime import long_running, patiently

    settings = _settings()
    engine = patiently(lambda: _engine(settings), "database")
    long_running("relay")
    raise typer.Exit(run_relay(engine, lambda: _publisher(settings), interval, grace, once))


@app.command()
def declare() -> None:
    """Declare every exchange and queue (needs configure permission; production applies
    deploy/rabbitmq/definitions.json instead)."""
    from kombu import Connection

    from pipeline.workers.topology import declare_topology

    settings = _settings()
    with _broker_refusals("declare", "it needs configure permission: run it as the broker's administrator"), \
            Connection(settings.broker_url, ssl=settings.broker_ssl_options()) as connection:
        declare_topology(connection, settings)
    typer.echo("declared binding.events, binding.stages, binding.results, binding.dlx and the stage queues")


@app.command()
def demo(ports: Annotated[int, typer.Option(min=1, max=100_000, help="ports to create")] = 300,
         database: Annotated[Path, typer.Option(help="SQLite file for the run (replaced)")] = Path("bindpipe-demo.sqlite")) -> None:
    """Bind a sample cloud's ports through the whole pipeline in one process and print a summary."""
    from pipeline.demo import print_summary, run_demo
    from pipeline.observability.logging import configure_logging

    configure_logging("console", "WARNING")
    summary = run_demo(ports, database.resolve())
    print_summary(summary)
    raise typer.Exit(0 if summary["results"] >= ports else 1)


@replay_app.command("results")
def replay_results(host: Annotated[str, typer.Option(help="compute host")],
                   since: Annotated[int, typer.Option(help="only results after this seq")] = 0) -> None:
    """Re-publish a host's current bindings (its latest result per port) to host.<host>."""
    from pipeline.workers.republish import replay_results as replay

    settings = _settings()
    with _broker_refusals("replay results", "it publishes to binding.results: use the worker's broker user"):
        count = replay(_engine(settings), _publisher(settings), host, since)
    typer.echo(f"re-published {count} results to host.{host}")


@replay_app.command("events")
def replay_events(first: Annotated[int, typer.Option("--from", help="first event-log seq")] = 1,
                  last: Annotated[int | None, typer.Option("--to", help="last event-log seq")] = None) -> None:
    """Feed stored events through the stages again (idempotent: finished work is not redone)."""
    from pipeline.workers.republish import replay_events as replay

    settings = _settings()
    with _broker_refusals("replay events", "it publishes to binding.events: use the publisher's broker user"):
        count = replay(_engine(settings), _publisher(settings), first, last)
    typer.echo(f"re-published {count} events to binding.events")


@app.command()
def watch(host: Annotated[str, typer.Option(help="compute host whose results to consume")],
          as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
          timeout: Annotated[float | None, typer.Option(help="exit after this many idle seconds")] = None) -> None:
    """Consume a compute host's results (its durable queue) and print one line each."""
    import json

    from pipeline.client import BindingClient
    from pipeline.models.binding import BindingResult

    settings = _settings()
    with _broker_refusals("watch", f"a compute host reads with its own broker user, made by `bindpipe broker "
                          f"add-compute-host {host}`"), BindingClient(settings=settings) as client:
        for body in client.watch(host, timeout=timeout):
            if as_json:
                typer.echo(json.dumps(body, sort_keys=True))
                continue
            result = BindingResult.model_validate(body)
            device = f" pci={result.pci_device.address}" if result.pci_device else ""
            why = f" reason={result.reason!r}" if result.reason else ""
            typer.echo(f"seq={result.seq} port={result.port_id} {result.outcome} vif_type={result.vif_type}"
                       f"{device}{why}")


@app.command()
def schema(out: Annotated[Path | None, typer.Option(help="write one <name>.schema.json per model here")] = None) -> None:
    """JSON Schemas of the bus contract (the envelope, each payload, the result), from the models."""
    import json

    from pipeline.models.contract import contract_schemas

    schemas = contract_schemas()
    if out is None:
        typer.echo(json.dumps(schemas, indent=2, sort_keys=True))
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, document in schemas.items():
        (out / f"{name}.schema.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {len(schemas)} schemas to {out}")


@app.command("metrics-server")
def metrics_server(port: Annotated[int | None, typer.Option(help="TCP port (default: BINDPIPE_METRICS_PORT, 9464)")] = None,
                   addr: Annotated[str | None, typer.Option(help="address to listen on (default: BINDPIPE_METRICS_ADDR, "
                                                            "0.0.0.0)")] = None) -> None:
    """Serve every worker's metrics (Prometheus multiprocess directory) on /metrics, and /healthz."""
    from pipeline.observability.health import healthz_app
    from pipeline.observability.metrics import serve
    from pipeline.runtime import long_running

    settings = _settings()
    long_running("metrics-server")
    serve(port or settings.metrics_port, addr or settings.metrics_addr,
          {"/healthz": healthz_app(settings.stall_seconds)})


def _machine_metrics() -> None:
    from pipeline.observability.metrics import metrics_dir
    from pipeline.runtime import ConfigurationError

    if metrics_dir() is None:
        raise ConfigurationError("the workers' readiness is read from their metrics: set BINDPIPE_METRICS_DIR "
                                 "(or PROMETHEUS_MULTIPROC_DIR) to the machine's multiprocess directory")


@app.command()
def health(stage: Annotated[str | None, typer.Option(help="only this stage's workers")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False) -> None:
    """Is every worker process of this machine ready (broker, database, consuming, loop turning)? Exit 0 or 1."""
    import json

    from pipeline.observability.health import machine_workers, render, report

    settings = _settings()
    _machine_metrics()
    summary = report(machine_workers(settings.stall_seconds), stage)
    typer.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json else render(summary), nl=as_json)
    raise typer.Exit(0 if summary["ready"] else 1)


@app.command()
def watchdog(interval: Annotated[float, typer.Option(help="seconds between two looks")] = 5.0,
             grace: Annotated[float, typer.Option(help="seconds a worker has to die of SIGABRT before SIGKILL")] = 10.0
             ) -> None:
    """End this machine's stalled workers (consuming, loop still for BINDPIPE_STALL_SECONDS) so that their
    supervisor starts them again: SIGABRT (their log shows where they hung), then SIGKILL."""
    import signal

    from pipeline.observability.health import Watchdog
    from pipeline.runtime import long_running

    settings = _settings()
    _machine_metrics()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    long_running("watchdog")
    Watchdog(settings.stall_seconds, grace).run(interval, lambda: bool(stopping))


@app.command()
def explain(port_id: Annotated[str, typer.Argument(help="the port's id")],
            as_json: Annotated[bool, typer.Option("--json", help="the whole report as JSON")] = False) -> None:
    """Why a port is (not) bound: every attempt, its inputs, each driver's decline, the PCI decision."""
    from pipeline.reports import main_explain

    raise typer.Exit(main_explain(_engine(_settings()), port_id, as_json))


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="the whole report as JSON")] = False) -> None:
    """Per host: agents (alive?), PCI pools, bindings; queue depths; dead letters."""
    from pipeline.reports import main_status

    settings = _settings()
    raise typer.Exit(main_status(settings, _engine(settings), as_json))


@app.command("migrate")
def migrate_database(revision: Annotated[str, typer.Option(help="target revision")] = "head",
                     check: Annotated[bool, typer.Option("--check", help="change nothing: exit 1 unless the "
                                                         "database is at head and matches the models")] = False) -> None:
    """Migrate the database (BINDPIPE_DATABASE_URL) to a revision, or --check that it is current."""
    from sqlalchemy.engine import make_url

    from pipeline import migrate

    settings = _settings()
    url = settings.database_url
    before = migrate.current(url)
    typer.echo(f"database: {make_url(url).render_as_string(hide_password=True)}")
    typer.echo(f"revision before: {before or '(none)'}")
    if check:
        head = migrate.head()
        try:
            migrate.check(url)
        except migrate.SchemaMismatch as exc:
            typer.echo(f"bindpipe migrate --check: {exc}", err=True)
            raise typer.Exit(1) from None
        if before != head:
            typer.echo(f"bindpipe migrate --check: the database is at {before or '(none)'}, not at head {head}",
                       err=True)
            raise typer.Exit(1)
        typer.echo(f"schema matches the models at head {head}")
        return
    try:
        after = migrate.upgrade(url, revision)
    except migrate.SchemaMismatch as exc:
        typer.echo(f"bindpipe migrate: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revision after: {after or '(none)'}")


# --- operator commands for the broker's users ----------------------------------------------------

broker_app = typer.Typer(no_args_is_help=True,
                         help="Operator commands for RabbitMQ (run where rabbitmqctl reaches the node).")
app.add_typer(broker_app, name="broker")


@broker_app.command("add-compute-host")
def broker_add_compute_host(host: Annotated[str, typer.Argument(help="the compute host, as results name it")],
                            vhost: Annotated[str, typer.Option(help="the vhost the definitions were applied to")]
                            = "bindpipe") -> None:
    """A compute host's results queue, and its own broker user that may only read it.

    The user is bindpipe-compute.HOST. Its password is BINDPIPE_RABBITMQ_COMPUTE_PASSWORD if set;
    else a new user gets a generated one (printed once) and an existing user keeps its own. Safe to
    run again."""
    import os

    from pipeline.broker_users import PASSWORD_ENV, BrokerAdminError, add_compute_host

    settings = _settings()
    password = os.environ.get(PASSWORD_ENV) or None
    try:
        added = add_compute_host(host, vhost, settings, password)
    except BrokerAdminError as exc:
        typer.echo(f"bindpipe broker add-compute-host: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"queue {added.queue} in vhost {vhost}, bound to host.{host} on binding.results")
    typer.echo(f"user {added.user} ({'new' if added.created else 'existing'}): may read {added.queue}, nothing else")
    if added.password is not None:
        typer.echo(f"password: {added.password}")
    elif password is not None:
        typer.echo(f"password: from {PASSWORD_ENV}")
    else:
        typer.echo("password: unchanged")


# --- dead letters ----------------------------------------------------------------------------------

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: what the stages refused, and what the broker gave "
                                                 "up on, as the database keeps them.")
app.add_typer(dlq_app, name="dlq")
def _stage(stage: str | None) -> str | None:
    if stage is not None and stage not in STAGE_NAMES:
        typer.echo(f"bindpipe dlq: unknown stage {stage!r}; one of {', '.join(STAGE_NAMES)}", err=True)
        raise typer.Exit(2)
    return stage


# checked as the command line is read: a usage mistake is told before the database is looked at
StageOption = Annotated[str | None, typer.Option("--stage", callback=_stage,
                                                 help="only this stage's: validate, select, allocate, compose")]


@dlq_app.command("list")
def dlq_list(stage: StageOption = None,
             everything: Annotated[bool, typer.Option("--all", help="the redriven ones too")] = False,
             limit: Annotated[int, typer.Option(min=1, help="newest first, at most this many")] = 100,
             as_json: Annotated[bool, typer.Option("--json", help="one JSON list")] = False) -> None:
    """The dead letters waiting (newest first): id, stage, category, the event and port they name."""
    from pipeline import dlq

    raise typer.Exit(dlq.list_rows(_engine(_settings()), _stage(stage), everything, limit, as_json))


@dlq_app.command("show")
def dlq_show(dead_letter_id: Annotated[int, typer.Argument(metavar="ID")],
             as_json: Annotated[bool, typer.Option("--json", help="as JSON")] = False,
             raw: Annotated[bool, typer.Option("--raw", help="only the body's bytes, as they arrived")] = False) -> None:
    """One dead letter whole: why, its routing key and headers, and its body."""
    from pipeline import dlq

    raise typer.Exit(dlq.show(_engine(_settings()), dead_letter_id, as_json, raw))


@dlq_app.command("redrive")
def dlq_redrive(ids: Annotated[list[int] | None, typer.Argument(metavar="[ID]...", help="these dead letters")] = None,
                stage: StageOption = None,
                everything: Annotated[bool, typer.Option("--all", help="every dead letter not redriven yet")] = False
                ) -> None:
    """Publish dead letters again where they first went, to be judged afresh (once fixed: a signing
    key added, a driver configured). Envelopes (stage validate) go to binding.events: use the
    publisher's broker user; hand-offs go to their stage: the worker's."""
    from pipeline.workers.republish import redrive

    if not (ids or stage or everything):
        typer.echo("bindpipe dlq redrive: name dead letters (IDs), a --stage, or --all", err=True)
        raise typer.Exit(2)
    settings = _settings()
    with _broker_refusals("dlq redrive", "redrive envelopes as the publisher's broker user, hand-offs as the worker's"):
        sent = redrive(_engine(settings), _publisher(settings), ids or None, _stage(stage))
    typer.echo(f"redrove {len(sent)} dead letter(s)" + (f": {', '.join(map(str, sent))}" if sent else ""))


@dlq_app.command("purge")
def dlq_purge(ids: Annotated[list[int] | None, typer.Argument(metavar="[ID]...", help="these dead letters")] = None,
              stage: StageOption = None,
              everything: Annotated[bool, typer.Option("--all", help="every dead letter")] = False) -> None:
    """Forget dead letters (they are not on the broker: the database is their only copy)."""
    from pipeline import dlq

    if not (ids or stage or everything):
        typer.echo("bindpipe dlq purge: name dead letters (IDs), a --stage, or --all", err=True)
        raise typer.Exit(2)
    raise typer.Exit(dlq.purge(_engine(_settings()), _stage(stage), ids or None))
