"""Configuration: environment variables prefixed ``BINDPIPE_``, optionally a TOML file.

With nothing set, everything runs in one process on kombu's in-memory transport and a SQLite
file (the embedded default); production points ``BINDPIPE_BROKER_URL`` at RabbitMQ and
``BINDPIPE_DATABASE_URL`` at PostgreSQL.

Lists are read as operators write them in ``ml2_conf.ini`` (``openvswitch,sriovnicswitch``) or as
JSON (``["openvswitch", "sriovnicswitch"]``). :func:`unknown_variables` names the ``BINDPIPE_*``
variables that are neither a setting nor one of :data:`OTHER_VARIABLES`: a misspelt setting
would otherwise leave its default in force without a word.
"""

import difflib
import os
import ssl
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.models.binding import DriverConfig

PREFIX = "BINDPIPE_"
NESTED = "__"
CONFIG_FILE_ENV = "BINDPIPE_CONFIG_FILE"
DEBUG_ENV = "BINDPIPE_DEBUG"
#: ``BINDPIPE_*`` variables that are not settings but are read by this project: the settings file,
#: tracebacks for every command, supervisord's run directory (deploy/supervisord.conf).
OTHER_VARIABLES = frozenset({CONFIG_FILE_ENV, DEBUG_ENV, "BINDPIPE_RUN_DIR"})
#: Prefixes of the project's other tools: the tests' services, the fault suite, the benchmark and
#: the production passwords deploy/rabbitmq/apply-definitions.sh hashes.
OTHER_PREFIXES = ("BINDPIPE_TEST_", "BINDPIPE_FAULT_", "BINDPIPE_BENCH_", "BINDPIPE_RABBITMQ_")


def _is_sequence(field: FieldInfo | None) -> bool:
    return field is not None and get_origin(field.annotation) in (tuple, list)


class _EnvironmentSource(EnvSettingsSource):
    """The environment, with comma-separated lists beside JSON ones (``BINDPIPE_MECHANISM_DRIVERS``,
    ``BINDPIPE_ML2__OVS_VNIC_TYPE_PROHIBIT_LIST``)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and _is_sequence(field) and not value.lstrip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return super().decode_complex_value(field_name, field, value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_nested_delimiter=NESTED, extra="forbid")

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
    metrics_port: int = Field(9464, ge=1, le=65535, description="TCP port of `bindpipe metrics-server`")
    metrics_addr: str = Field("0.0.0.0", description="address `bindpipe metrics-server` listens on")
    stall_seconds: float = Field(60.0, gt=0, description="a consuming worker whose loop has not turned for "
                                 "this long is stalled (/healthz, the supervisord watchdog)")
    log_format: Literal["json", "console"] = "console"

    @field_validator("ml2", mode="before")
    @classmethod
    def _driver_options_from_text(cls, value: Any) -> Any:
        """Environment variables are text: ``BINDPIPE_ML2__OVS_CREATE_TAP=false`` is read as pydantic
        reads text (its lax mode), since the driver options themselves take only real booleans."""
        if not isinstance(value, dict):
            return value
        fields = DriverConfig.model_fields
        read = dict(value)
        for key, item in value.items():
            if isinstance(item, str) and key in fields and fields[key].annotation in (bool, int):
                try:
                    read[key] = TypeAdapter(fields[key].annotation).validate_python(item)
                except ValidationError:
                    pass  # DriverConfig names the option and the value
        return read

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
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvironmentSource(settings_cls)]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _known_names(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """(exact variable names, name prefixes) that set a field of ``model``, upper-case."""
    names, prefixes = set(), set()
    for name, field in model.model_fields.items():
        variable = f"{prefix}{name}".upper()
        names.add(variable)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner_names, inner_prefixes = _known_names(annotation, variable + NESTED)
            names |= inner_names
            prefixes |= inner_prefixes
        elif get_origin(annotation) is dict or dict in get_args(annotation):
            prefixes.add(variable + NESTED)  # BINDPIPE_SIGNING_KEYS__<key id>
    return names, prefixes


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``BINDPIPE_*`` variables of ``environ`` that nothing reads, each with a suggestion
    ("BINDPIPE_BATCH_SIZ (did you mean BINDPIPE_BATCH_SIZE?)")."""
    environ = os.environ if environ is None else environ
    names, prefixes = _known_names(Settings, PREFIX)
    names |= OTHER_VARIABLES
    found = []
    for variable in sorted(environ):
        upper = variable.upper()
        if (not upper.startswith(PREFIX) or upper in names
                or upper.startswith(OTHER_PREFIXES) or upper.startswith(tuple(prefixes))):
            continue
        close = difflib.get_close_matches(upper, sorted(names), n=1, cutoff=0.8)
        found.append(f"{variable} (did you mean {close[0]}?)" if close else variable)
    return found
