"""Structured logs: one stream (stderr) for structlog and for the stdlib loggers of kombu, amqp, sqlalchemy.

Processor chain, for structlog calls (rendered and written to stderr directly) and, via
``ProcessorFormatter``, for stdlib records alike::

    merge_contextvars -> merge_event_context -> add_log_level -> TimeStamper(iso, utc) -> StackInfoRenderer
      -> format_exc_info (json only) -> redact_secrets -> JSONRenderer | ConsoleRenderer

``ConsoleRenderer`` formats exceptions itself (structlog warns when ``format_exc_info`` runs before
it), so the console chain leaves ``exc_info`` to it, with a plain, redacted traceback (never rich's
locals, which could hold secrets). Per message, workers call :func:`bind_event_context_lazily` so
every line carries ``event_id``, ``port_id``, ``host`` and ``stage``: the context is built only when
a line is written (a worker handles thousands of jobs a second and logs about few of them).

:func:`redact_secrets` replaces with ``***``: the value of any key that names a secret (password,
passwd, secret, token, signature, credential, authorization, cookie, or a name ending in ``key``/
``keys`` such as ``api_key``, ``private_key``, ``signing_keys`` — but not ``routing_key`` and the
other names in ``NON_SECRET_KEY_NAMES``), at any depth of dicts/lists; and, inside every string,
the password of a URL (``amqp://user:pass@host`` -> ``amqp://user:***@host``) and of a libpq
``password=...`` pair.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "***"
NON_SECRET_KEY_NAMES = frozenset({
    "routing_key", "binding_key", "dedup_key", "idempotency_key", "partition_key", "sort_key", "hash_key",
    "key_id",
})
_SECRET_KEY = re.compile(r"pass(word|wd)|secret|token|signature|credential|authori[sz]ation|cookie|keys?$",
                         re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+@")
_DSN_PASSWORD = re.compile(r"(?P<head>\bpass(word|wd)\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_MAY_HOLD_PASSWORD = re.compile(r"://|pass", re.IGNORECASE)  # what either pattern above needs

_HANDLER_NAME = "bindpipe"
# Alembic announces its plugins, its dialect and what it compares at INFO whenever a command checks
# the schema; `bindpipe migrate` reports the revisions itself.
QUIET_LOGGERS = ("alembic",)


def is_secret_key(name: object) -> bool:
    return isinstance(name, str) and _is_secret_name(name)


@functools.lru_cache(maxsize=1024)
def _is_secret_name(name: str) -> bool:
    """Cached: every log line asks it of each of its keys, and the keys repeat."""
    return name.lower() not in NON_SECRET_KEY_NAMES and bool(_SECRET_KEY.search(name))


def redact_text(text: str) -> str:
    """Mask URL and libpq passwords inside ``text``."""
    if not _MAY_HOLD_PASSWORD.search(text):
        return text
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)
    if "pass" in text.lower():
        text = _DSN_PASSWORD.sub(rf"\g<head>{REDACTED}", text)
    return text


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if depth > 8:  # logs never need deeper structures; do not recurse without bound
        return value
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) else _redact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v, depth + 1) for v in value)
    return value


def redact_secrets(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: see the module docstring for what is masked. The keys that name a
    secret are known per shape of line (cached), and a line's strings are searched once, together,
    for what a password in a URL or DSN needs: most lines (ids, numbers) are left as they are.
    (ProcessorFormatter's ``_record`` / ``_from_structlog`` are neither strings nor containers.)"""
    secret = _secret_keys(tuple(event_dict))
    may_hold_password = _MAY_HOLD_PASSWORD.search("\n".join(v for v in event_dict.values() if isinstance(v, str)))
    for key, value in event_dict.items():
        if key in secret:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            if may_hold_password:
                event_dict[key] = redact_text(value)
        elif isinstance(value, (dict, list, tuple)):
            event_dict[key] = _redact(value)
    return event_dict


@functools.lru_cache(maxsize=1024)
def _secret_keys(keys: tuple[Any, ...]) -> frozenset[Any]:
    return frozenset(key for key in keys if is_secret_key(key))


def _redacted_traceback(sio: TextIO, exc_info: Any) -> None:
    """ConsoleRenderer's exception formatter: a plain traceback, redacted (rich's would print locals)."""
    sio.write("\n" + redact_text("".join(traceback.format_exception(*exc_info))).rstrip("\n"))


class _StderrLogger:
    """structlog's output: each rendered line to ``sys.stderr`` as it is when written (a binding
    made at configure time would outlive a swapped stream, e.g. pytest's capture)."""

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_STDERR = _StderrLogger()


def _json_line(event_dict: dict[str, Any], default: Callable[[Any], Any] | None = None) -> str:
    """A JSON log line by orjson (a worker writes one per binding: ~3 times faster than json.dumps)."""
    return orjson.dumps(event_dict, default=default, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(fmt: str = "console", level: int | str = "INFO") -> None:
    """Configure structlog and the stdlib root logger once per process (calling again reconfigures).

    ``fmt`` is ``json`` (production; one JSON object per line) or ``console`` (development).
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        merge_event_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any
    if fmt == "json":
        final: list[Any] = [structlog.processors.format_exc_info, redact_secrets]
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    else:
        final = [redact_secrets]
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=_redacted_traceback)

    # structlog's own lines are rendered and written directly, not through a stdlib LogRecord:
    # half the cost of a line, and a worker writes one per binding.
    structlog.configure(
        processors=[*shared, *final, renderer],
        logger_factory=lambda *_: _STDERR,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


_EVENT_CONTEXT: ContextVar[dict[str, Any] | Callable[[], dict[str, Any]] | None] = ContextVar(
    "bindpipe_event_context", default=None)


def bind_event_context(event_id: str | None = None, port_id: str | None = None, host: str | None = None,
                       stage: str | None = None, **extra: Any) -> None:
    """Bind this message's context, replacing the previous one's (``None`` values are left out)."""
    _EVENT_CONTEXT.set({"event_id": event_id, "port_id": port_id, "host": host, "stage": stage, **extra})


def bind_event_context_lazily(context: Callable[[], dict[str, Any]]) -> None:
    """Like :func:`bind_event_context`, with ``context()`` called only if a line is written."""
    _EVENT_CONTEXT.set(context)


def clear_event_context() -> None:
    _EVENT_CONTEXT.set(None)


def merge_event_context(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the bound event context, under what the line itself says."""
    context = _EVENT_CONTEXT.get()
    if context is not None:
        for key, value in (context() if callable(context) else context).items():
            if value is not None:
                event_dict.setdefault(key, value)
    return event_dict
