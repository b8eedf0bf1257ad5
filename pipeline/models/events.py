"""The bus contract: event envelopes in, binding results out.

Payloads reuse the dry-run scenario objects, so a scenario can be replayed as events unchanged.
"""

from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid4

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from pipeline.models.binding import RequestContext
from pipeline.models.pci import HostPciInventory
from pipeline.models.topology import Agent, Network, Port

EventType = Literal["agent.report", "pci.inventory", "network.upsert", "network.delete",
                    "port.create", "port.update", "port.delete", "binding.request"]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]


class NetworkDelete(BaseModel):
    id: str


class PortDelete(BaseModel):
    id: str


class NetworkUpsert(Network):
    id: str


class PortPayload(Port):
    """``port.create`` / ``port.update``: the port object; its network must be known."""

    network_id: str


class BindingRequestPayload(BaseModel):
    """Bind an existing port on ``host``; ``vnic_type`` / ``profile`` replace the stored ones if given."""

    model_config = ConfigDict(extra="forbid")

    port_id: str
    host: str
    vnic_type: Any = None
    profile: Any = None


class PciInventoryPayload(HostPciInventory):
    host: str


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "agent.report": Agent,
    "pci.inventory": PciInventoryPayload,
    "network.upsert": NetworkUpsert,
    "network.delete": NetworkDelete,
    "port.create": PortPayload,
    "port.update": PortPayload,
    "port.delete": PortDelete,
    "binding.request": BindingRequestPayload,
}


class Envelope(BaseModel):
    """``{event_id, event_type, occurred_at, context, payload}``; ``event_type`` equals the routing key."""

    model_config = ConfigDict(extra="forbid")

    event_id: UUID
    event_type: EventType
    occurred_at: datetime
    context: RequestContext = Field(default_factory=RequestContext)
    payload: dict[str, Any]
    # Private attributes are read through ``__pydantic_private__``: ``self._x`` goes through
    # ``BaseModel.__getattr__`` (~3 µs a read, 7 reads an event in the validate stage).
    _raw: bytes | str | None = PrivateAttr(default=None)  # the JSON it was decoded from, if it was
    _typed: tuple[dict[str, Any], BaseModel] | None = PrivateAttr(default=None)  # (payload, as validated)
    _key: tuple[UUID, str] | None = PrivateAttr(default=None)  # (event_id, as text)

    @property
    def key(self) -> str:
        """``event_id`` as text: the event's key in the log, the marks, the jobs and the log lines."""
        private = self.__pydantic_private__
        cached = private["_key"]
        if cached is None or cached[0] is not self.event_id:
            cached = private["_key"] = (self.event_id, str(self.event_id))
        return cached[1]

    def as_received(self) -> Any:
        """The envelope for the event log: the JSON as it arrived (orjson writes it unchanged), else
        the model's JSON form."""
        raw = self.__pydantic_private__["_raw"]
        return orjson.Fragment(raw) if raw is not None else self.model_dump(mode="json")

    def as_json(self) -> Any:
        """The envelope as JSON values: what arrived, parsed (two copies of one event compare equal)."""
        raw = self.__pydantic_private__["_raw"]
        return orjson.loads(raw) if raw is not None else self.model_dump(mode="json")

    @model_validator(mode="after")
    def _payload_matches_type(self) -> "Envelope":
        self.typed_payload()
        _ = self.key  # cached here too, so that envelopes validated from the same data compare equal
        return self

    def typed_payload(self) -> BaseModel:
        """The payload as its event type's model: validated with the envelope, and again only if
        the payload was replaced since (``model_copy(update=...)`` copies the private attributes)."""
        private = self.__pydantic_private__
        typed = private["_typed"]
        if typed is None or typed[0] is not self.payload:
            typed = private["_typed"] = (self.payload, PAYLOAD_MODELS[self.event_type].model_validate(self.payload))
        return typed[1]

    @classmethod
    def new(cls, event_type: str, payload: dict[str, Any], context: RequestContext | None = None) -> "Envelope":
        return cls(event_id=uuid4(), event_type=event_type, occurred_at=datetime.now(UTC),
                   context=context or RequestContext.service(), payload=payload)
