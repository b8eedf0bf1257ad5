"""JSON Schemas of the bus contract, generated from the pydantic models (``bindpipe schema``)."""

from typing import Any

from pipeline.models.binding import BindingResult
from pipeline.models.events import PAYLOAD_MODELS, Envelope


def contract_schemas() -> dict[str, dict[str, Any]]:
    """``envelope``, one ``payload.<event_type>`` per routing key, and ``result``."""
    schemas = {"envelope": Envelope.model_json_schema()}
    for event_type, model in PAYLOAD_MODELS.items():
        schemas[f"payload.{event_type}"] = model.model_json_schema()
    schemas["result"] = BindingResult.model_json_schema(mode="serialization")
    for name, document in schemas.items():
        document["$id"] = f"https://binding-pipeline.invalid/schemas/{name}.schema.json"
    return schemas
