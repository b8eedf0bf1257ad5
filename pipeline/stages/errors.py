"""Errors a binding request can end in before any driver runs.

``str(error)`` is ``"<Class>: <field>: <reason>"``; the class is what the conformance rules compare.
"""

from pipeline.models import vocabulary as v


class BindingRequestError(Exception):
    error_class = "Error"

    def __init__(self, field: str | None, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)

    def __str__(self) -> str:
        return f"{self.error_class}: {super().__str__()}"


class InvalidInput(BindingRequestError):
    error_class = v.ERR_INVALID_INPUT


class PolicyNotAuthorized(BindingRequestError):
    error_class = v.ERR_POLICY


class ConfigError(BindingRequestError):
    error_class = v.ERR_CONFIG
