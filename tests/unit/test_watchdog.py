"""The stall watchdog's decision: which partitions hold records nobody is processing."""

from __future__ import annotations

import pytest

from trialwatch.watchdog import Stall, find_stalls


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
