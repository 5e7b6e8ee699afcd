"""Hospital-side adapters: HL7 v2 ORU^R01 and FHIR R4 in, contract v1 events out."""

from __future__ import annotations

import json
from typing import Protocol, TextIO

from pydantic import BaseModel

from trialwatch.contract import TOPIC_BY_MODEL, InputEvent


class EventSink(Protocol):
    """Where an adapter sends the events it mapped: `trialwatch.publisher.Publisher` satisfies it."""

    async def publish(self, topic: str, value: BaseModel) -> None: ...


class EventFileSink:
    """Writes events as event-file lines (`{"topic", "value"}`) instead of sending them: `--dry-run`."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    async def publish(self, topic: str, value: BaseModel) -> None:
        line = {"topic": topic, "value": json.loads(value.model_dump_json(exclude_unset=True))}
        self._out.write(json.dumps(line, ensure_ascii=False) + "\n")


def topic_of(event: InputEvent) -> str:
    return TOPIC_BY_MODEL[type(event)]
