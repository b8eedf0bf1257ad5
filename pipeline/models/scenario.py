"""The offline ("dry-run") scenario: a topology, a configuration and one port to bind."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.binding import RequestContext
from pipeline.models.pci import HostPciInventory
from pipeline.models.topology import Agent, Network, Port


class Scenario(BaseModel):
    """One dry-run scenario (format: ``shared/conformance/README.md``), plus three optional keys:

    * ``context``: who sends the request (default: the service role, as Nova does);
    * ``pci_devices``: host name -> PCI inventory; a host listed here has its device chosen by
      this pipeline, with Nova's accounting rules, instead of trusting the profile;
    * ``original``: the port's previous binding ``{host, profile, vif_details}`` (live migration).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    tags: list[str] = Field(default_factory=list)
    mechanism_drivers: list[str]
    config: dict[str, Any] = Field(default_factory=dict)
    network: Network
    agents: list[Agent] = Field(default_factory=list)
    port: Port
    context: RequestContext = Field(default_factory=RequestContext.service)
    pci_devices: dict[str, HostPciInventory] = Field(default_factory=dict)
    original: dict[str, Any] | None = None
