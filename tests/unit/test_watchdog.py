"""The stall watchdog's decision: which partitions hold records nobody is processing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP, Message

from trialwatch.faust_fixes import hold_commits_at_unacknowledged_records, upstream_new_offset
from trialwatch.watchdog import Skip, SkipDetector, Stall, find_stalls


def decide(
    committed: dict[str, int | None],
    highwater: dict[str, int | None],
    *,
    idle_s: float = 30.0,
    busy: bool = False,
    tried: dict[str, tuple[int, int]] | None = None,
) -> list[Stall[str]]:
    return find_stalls(committed, highwater, idle_s=idle_s, idle_threshold_s=10.0, busy=busy, already_tried=tried or {})


class TestFindStalls:
    """Records beyond the committed offset while idle are a stall; nothing else is."""

    def test_record_beyond_committed_offset_while_idle_is_a_stall(self) -> None:
        assert [Stall("labs-0", 71, 72)] == decide({"labs-0": 71, "labs-1": 76}, {"labs-0": 72, "labs-1": 76})

    @pytest.mark.parametrize(
        ("idle_s", "busy"), [(9.9, False), (30.0, True)], ids=["recently-active", "handling-a-record"]
    )
    def test_no_stall_while_the_agent_may_still_be_working(self, idle_s: float, busy: bool) -> None:
        assert [] == decide({"labs-0": 71}, {"labs-0": 72}, idle_s=idle_s, busy=busy)

    def test_caught_up_partition_is_not_a_stall(self) -> None:
        assert [] == decide({"labs-0": 72}, {"labs-0": 72})

    def test_unknown_offsets_are_not_guessed(self) -> None:
        assert [] == decide({"labs-0": None}, {"labs-0": 72}) + decide({"labs-0": 3}, {"labs-0": None})

    def test_same_gap_is_re_read_once_then_left_alone(self) -> None:
        """Offsets taken by transaction markers never get committed; do not seek on every check."""
        assert [] == decide({"labs-0": 71}, {"labs-0": 72}, tried={"labs-0": (71, 72)})

    def test_new_records_after_a_re_read_are_a_new_stall(self) -> None:
        assert [Stall("labs-0", 71, 73)] == decide({"labs-0": 71}, {"labs-0": 73}, tried={"labs-0": (71, 72)})


class TestSkipDetector:
    """A jump in a partition's offsets within one generation is a skipped record; nothing else is."""

    def test_a_jump_in_the_middle_of_a_partition_is_a_skip(self) -> None:
        detector = SkipDetector()
        assert [] == detector.check(1, [("labs", 3, 8), ("labs", 3, 9)])
        assert [Skip("labs", 3, 10, 11)] == detector.check(1, [("scans", 0, 4), ("labs", 3, 11)])

    def test_partitions_are_followed_apart(self) -> None:
        detector = SkipDetector()
        assert [] == detector.check(1, [("labs", 0, 5), ("labs", 1, 70), ("labs", 0, 6), ("labs", 1, 71)])

    def test_a_new_generation_starts_afresh(self) -> None:
        """After a rebalance the partition may have been processed elsewhere: the first offset is not a gap."""
        detector = SkipDetector()
        detector.check(1, [("labs", 0, 5)])
        assert [] == detector.check(2, [("labs", 0, 90)])

    def test_a_re_read_after_seeking_back_is_followed_not_flagged(self) -> None:
        detector = SkipDetector()
        detector.check(1, [("labs", 0, 9), ("labs", 0, 11)])
        assert [] == detector.check(1, [("labs", 0, 12), ("labs", 0, 10), ("labs", 0, 11), ("labs", 0, 12)])


def _faust_consumer() -> Any:
    app = faust.App("tw-watchdog-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    return app.consumer


class TestFaustDropsARecordAtARebalance:
    """The root cause, against the installed faust-streaming: without the correction a record is lost.

    If a Faust upgrade fixes either half, these tests fail and say so: then
    `faust_fixes` and the skip detector can go.
    """

    async def test_a_delivery_pending_when_the_flow_is_suspended_is_dropped(self) -> None:
        consumer = _faust_consumer()
        tp = TP("trial.labs.v1", 3)
        fetched = [
            Message(tp.topic, tp.partition, o, 0.0, 0, None, key=b"S-1", value=b"{}", checksum=None)
            for o in (9, 10, 11)
        ]
        delivered: list[int] = []
        buffer_has_room = asyncio.Event()

        async def getmany(timeout: float) -> Any:
            for message in fetched:
                yield tp, message
            await asyncio.sleep(3600)

        async def deliver(message: Any) -> None:
            if message.offset == 10:
                await buffer_has_room.wait()  # the agent's buffer is full
            delivered.append(message.offset)

        consumer.getmany, consumer.callback = getmany, deliver
        fetcher = SimpleNamespace(_stopped=asyncio.Event())
        drain = asyncio.create_task(consumer._drain_messages(fetcher))
        try:
            await asyncio.sleep(0.05)
            consumer.stop_flow()  # a rebalance begins
            await asyncio.sleep(0.05)
            consumer.resume_flow()
            buffer_has_room.set()
            await asyncio.sleep(0.05)
        finally:
            drain.cancel()

        assert [9, 11] == delivered, "record 10 was never handed to the agent"
        assert 11 == consumer._read_offset[tp], "and the consumer moved past it"

    def test_faust_commits_past_a_single_missing_record_and_the_correction_holds_there(self) -> None:
        consumer = _faust_consumer()
        tp = TP("trial.labs.v1", 3)

        def acked(offsets: list[int], committed: int) -> None:
            consumer._acked[tp], consumer._acked_index[tp] = list(offsets), set(offsets)
            consumer._committed_offset[tp] = committed

        acked([11], 10)
        assert 12 == upstream_new_offset(consumer, tp), "faust-streaming commits past offset 10"

        hold_commits_at_unacknowledged_records()
        acked([11], 10)
        assert consumer._new_offset(tp) is None, "corrected: held at 10"
        consumer._acked[tp].append(10)
        consumer._acked_index[tp].add(10)
        assert 12 == consumer._new_offset(tp), "released once 10 is processed"

    def test_the_correction_leaves_gaps_faust_recorded_in_the_log_alone(self) -> None:
        """Offsets the fetch jumped over (compaction, transaction markers) are not records to wait for."""
        consumer = _faust_consumer()
        hold_commits_at_unacknowledged_records()
        tp = TP("trial.labs.v1", 3)
        consumer._gap[tp].addi(10, 11)
        consumer._acked[tp], consumer._acked_index[tp] = [11], {11}
        consumer._committed_offset[tp] = 10
        assert 12 == consumer._new_offset(tp)
