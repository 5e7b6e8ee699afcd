"""The publisher API hospital code imports: validates like the service, sends keyed by subject_id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.e2e.conftest import lab, read_topic
from trialwatch.publisher import InvalidEvent, Publisher, SyncPublisher

pytestmark = pytest.mark.e2e


class TestPublisher:
    """Valid events reach the topic keyed by subject; invalid ones raise and are not sent."""

    async def test_async_publisher_sends_valid_and_refuses_invalid(self, bootstrap: str, subject_prefix: str) -> None:
        s = f"{subject_prefix}-pub"
        good = lab(s, f"{s}-1", 140, at="2025-03-02T08:00:00+08:00")["value"]
        naive = lab(s, f"{s}-2", 140, at="2025-03-02T08:00:00")["value"]
        async with Publisher(bootstrap) as publisher:
            await publisher.publish("trial.labs.v1", good)
            with pytest.raises(InvalidEvent) as refused:
                await publisher.publish("trial.labs.v1", naive)
        assert "naive_datetime" == refused.value.reason

        sent = await read_topic(
            bootstrap, "trial.labs.v1", lambda v: v.get("subject_id") == s, lambda f: True, settle_s=2
        )
        assert [f"{s}-1"] == [v["event_id"] for v in sent]

    async def test_sync_publisher_for_code_without_an_event_loop(self, bootstrap: str, subject_prefix: str) -> None:
        s = f"{subject_prefix}-sync"
        events = [lab(s, f"{s}-{i}", 140 + i, at="2025-03-02T08:00:00+08:00")["value"] for i in range(3)]

        def hospital_code() -> Any:
            with SyncPublisher(bootstrap) as publisher:
                for event in events:
                    publisher.publish("trial.labs.v1", event)
                with pytest.raises(InvalidEvent):
                    publisher.publish("trial.labs.v1", {**events[0], "unit": "g/L"})

        await asyncio.to_thread(hospital_code)
        sent = await read_topic(
            bootstrap, "trial.labs.v1", lambda v: v.get("subject_id") == s, lambda f: len(f) >= 3, settle_s=2
        )
        assert [f"{s}-{i}" for i in range(3)] == [v["event_id"] for v in sent]
