"""The message that travels between stage queues: one port's binding work, enriched per stage."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.models.binding import AllocationDecision, RequestContext, SelectionOutcome
from pipeline.models.topology import Port


class BindingJob(BaseModel):
    """``bind``: (re)bind ``port`` at ``revision``; ``unbind``: clear the port's binding on ``old_host``.

    ``job_id`` (event id and port id) keys every stage's idempotency mark. A job whose
    ``revision`` is no longer the port's current one is stale: later stages drop it.
    """

    job_id: str
    event_id: str
    occurred_at: datetime
    port_id: str
    revision: int
    action: Literal["bind", "unbind"]
    port: Port | None = None
    old_host: str | None = None
    context: RequestContext = Field(default_factory=RequestContext.service)
    original: dict[str, Any] | None = None
    error: str | None = None
    vnic_type: str | None = None
    profile: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    selection: SelectionOutcome | None = None
    allocation: AllocationDecision | None = None


class Handoff(BaseModel):
    """A message between stage queues: many jobs, so one publish serves a whole batch."""

    jobs: list[BindingJob] = Field(min_length=1)
