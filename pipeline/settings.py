"""Configuration: environment variables prefixed ``BINDPIPE_``, optionally a TOML file.

With nothing set, everything runs in one process on kombu's in-memory transport and a SQLite
file (the embedded default); production points ``BINDPIPE_BROKER_URL`` at RabbitMQ and
``BINDPIPE_DATABASE_URL`` at PostgreSQL.
"""

import os
import ssl
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from pipeline.models.binding import DriverConfig

CONFIG_FILE_ENV = "BINDPIPE_CONFIG_FILE"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BINDPIPE_", env_nested_delimiter="__", extra="forbid")

    broker_url: str = "memory://localhost/"
    database_url: str = "sqlite:///bindpipe.sqlite"
    mechanism_drivers: tuple[str, ...] = ("openvswitch", "ovn", "sriovnicswitch", "macvtap", "l2population")
    ml2: DriverConfig = Field(default_factory=DriverConfig)

    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(5, ge=1, description="deliveries before RabbitMQ dead-letters a message")
    # measured (benchmarks/RESULTS.md): a batch's fixed costs (its transactions, the PCI hosts and
    # agents it loads, its statements) made 200 cost ~25 % more CPU a binding than 1000 under load;
    # a batch fills up only under load, so a lone event still waits at most batch_wait_ms a stage
    batch_size: int = Field(2000, ge=1, description="events (validate) or jobs handled in one transaction")
    batch_wait_ms: int = Field(10, ge=0, description="how long a partial batch waits for more")
    prefetch: int = Field(4000, ge=1, description="events in hand (later stages: as many jobs, in hand-offs)")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    agent_down_time: int = Field(75, ge=1, description="seconds without heartbeat before an agent is dead")
    heartbeat: int = Field(30, ge=0, description="AMQP heartbeat in seconds")
    confirm_timeout: float = Field(10.0, gt=0, description="seconds to wait for the broker to confirm a batch")
    transaction_retry_seconds: float = Field(
        5.0, ge=0, description="how long a worker retries a transaction that met a transient error before it holds "
        "the batch (kept in hand, unacked) and tries again later")
    hold_backoff_min: float = Field(0.5, gt=0, description="first pause before a held batch is tried again")
    hold_backoff_max: float = Field(10.0, gt=0, description="longest pause between tries of a held batch")
    signing_keys: dict[str, SecretStr] = Field(default_factory=dict, description="key id -> HMAC secret")
    require_signatures: bool = False
    signing_key_id: str | None = Field(None, description="the key this process signs what it publishes with")
    signing_key_roles: dict[str, tuple[str, ...]] = Field(default_factory=dict, description="key id -> the roles an "
                                                           "event signed with it may assert (none if not listed)")
    declare_topology: bool = Field(True, description="declare exchanges and queues at start; false for a "
                                   "least-privilege broker user (the definitions file declares them)")
    broker_tls: bool = False
    broker_ca_file: str | None = None
    broker_cert_file: str | None = None
    broker_key_file: str | None = None
    metrics_dir: str | None = None
    log_format: Literal["json", "console"] = "console"

    @model_validator(mode="after")
    def _every_verified_key_has_roles(self) -> "Settings":
        """Where signatures are required, a key without an entry could assert no role at all: that
        is an upgrade's missing setting far more often than an intent, so say so at start."""
        if self.require_signatures and (missing := sorted(set(self.signing_keys) - set(self.signing_key_roles))):
            raise ValueError(f"signing_key_roles: no entry for signing key(s) {missing}: list the roles each key "
                             "may assert in an event's context ([] for none)")
        return self

    def driver_config(self) -> DriverConfig:
        return self.ml2.model_copy(update={"mechanism_drivers": tuple(self.mechanism_drivers)})

    def broker_ssl_options(self) -> dict[str, Any] | bool:
        """kombu's ``ssl=`` for the broker: False, or verified TLS with the configured files."""
        if not self.broker_tls:
            return False
        options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
        if self.broker_ca_file:
            options["ca_certs"] = self.broker_ca_file
        if self.broker_cert_file:
            options["certfile"], options["keyfile"] = self.broker_cert_file, self.broker_key_file
        return options

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("memory://")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)
