"""Every exchange, queue and argument of the bus, declared in one place.

Stage queues are quorum queues (classic as an option) with an explicit delivery limit — RabbitMQ
3.10 has no default — and a dead-letter exchange routing each stage's rejects to its own DLQ.
"""

from kombu import Connection, Exchange, Queue

from pipeline.settings import Settings

STAGES = ("validate", "select", "allocate", "compose")
EVENTS = Exchange("binding.events", type="topic", durable=True)
STAGE_EXCHANGE = Exchange("binding.stages", type="direct", durable=True)
RESULTS = Exchange("binding.results", type="topic", durable=True)
# What clients bind to: only checked, as compute hosts and publishers may not configure it.
RESULTS_PASSIVE = Exchange("binding.results", type="topic", durable=True, passive=True)
DEAD_LETTERS = Exchange("binding.dlx", type="direct", durable=True)


def queue_arguments(settings: Settings, stage: str | None = None) -> dict[str, object]:
    args: dict[str, object] = {"x-queue-type": settings.queue_type}
    if stage is not None:
        args.update({"x-dead-letter-exchange": DEAD_LETTERS.name, "x-dead-letter-routing-key": stage})
        if settings.queue_type == "quorum":
            args.update({"x-delivery-limit": settings.delivery_limit,
                         "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return args


def stage_queue(stage: str, settings: Settings, no_declare: bool = False) -> Queue:
    """``binding.validate`` takes every event; the later stages take their hand-offs.
    ``no_declare``: consume without declaring (the topology is declared once, elsewhere)."""
    exchange, routing_key = (EVENTS, "#") if stage == "validate" else (STAGE_EXCHANGE, stage)
    return Queue(f"binding.{stage}", exchange, routing_key=routing_key, durable=True, no_declare=no_declare,
                 queue_arguments=queue_arguments(settings, stage))


def dead_letter_queue(stage: str, settings: Settings, no_declare: bool = False) -> Queue:
    return Queue(f"binding.{stage}.dlq", DEAD_LETTERS, routing_key=stage, durable=True, no_declare=no_declare,
                 queue_arguments=queue_arguments(settings))


def host_routing_key(host: str) -> str:
    return f"host.{host}"


def results_queue_name(host: str) -> str:
    return f"binding.results.{host}"


def results_queue(host: str, settings: Settings, exchange: Exchange = RESULTS, no_declare: bool = False) -> Queue:
    """A compute host's own durable queue of results (``exchange``: ``RESULTS_PASSIVE`` to only
    check the exchange)."""
    return Queue(results_queue_name(host), exchange, routing_key=host_routing_key(host), durable=True,
                 no_declare=no_declare, queue_arguments=queue_arguments(settings))


def existing_results_queue(connection: Connection, host: str, settings: Settings) -> Queue:
    """The host's results queue, to consume without declaring anything. The operator creates it
    (``bindpipe broker add-compute-host``), as the host's own broker user may only read it; where it
    is missing (a development broker) it is declared here, which needs configure permission on it."""
    queue = results_queue(host, settings, RESULTS_PASSIVE)
    channel = connection.channel()
    try:
        queue(channel).queue_declare(passive=True)
    except connection.channel_errors as exc:
        if str(getattr(exc, "reply_code", "")) != "404":
            raise
        with connection.channel() as fresh:  # the broker closed the other one
            queue(fresh).declare()
    finally:
        channel.close()
    return results_queue(host, settings, RESULTS_PASSIVE, no_declare=True)


def declare_topology(connection: Connection, settings: Settings) -> None:
    channel = connection.default_channel
    for exchange in (EVENTS, STAGE_EXCHANGE, RESULTS, DEAD_LETTERS):
        exchange(channel).declare()
    for stage in STAGES:
        stage_queue(stage, settings)(channel).declare()
        dead_letter_queue(stage, settings)(channel).declare()


def check_topology(channel, queues: list[Queue]) -> None:  # noqa: ANN001 - a kombu channel
    """Passive declares: succeed without configure permission, fail clearly if a queue is missing."""
    for queue in queues:
        try:
            queue(channel).queue_declare(passive=True)
        except channel.connection.client.channel_errors as exc:
            raise RuntimeError(f"queue {queue.name} does not exist on the broker ({exc}); apply "
                               "deploy/rabbitmq/definitions.json or run `bindpipe declare` as an admin") from None
