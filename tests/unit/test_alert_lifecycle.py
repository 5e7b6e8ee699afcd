"""The alert lifecycle of contract v1: ids, revisions, escalation, resolution, idempotence, episodes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from trialwatch.contract import AlertMessage, InputEvent
from trialwatch.engine import Engine

if TYPE_CHECKING:
    from tests.unit.conftest import ApplyAll, EngineRun, EventFactory
    from trialwatch.protocol import Protocol

State = tuple[str, str, int]  # status, severity, revision


def states(alerts: list[AlertMessage]) -> list[State]:
    return [(a.status, a.severity, a.revision) for a in alerts]


def platelets(make: EventFactory, value: float, **fields: Any) -> InputEvent:
    return make.lab(analyte="platelets", value=value, unit="10*9/L", **fields)


def bilirubin(make: EventFactory, value: float, **fields: Any) -> InputEvent:
    return make.lab(analyte="total_bilirubin", value=value, unit="umol/L", ref_high=17.1, **fields)


class TestDeterministicIds:
    """Re-processing the same input in a fresh engine yields the same alert ids, revisions and states."""

    def test_labs_and_adverse_events(self, make: EventFactory, apply_all: ApplyAll) -> None:
        events = [
            make.enrollment(arm="control"),
            platelets(make, 40.0, day=1),
            bilirubin(make, 60.0, day=1),
            platelets(make, 20.0, day=2),
            make.ae(ae_id="AE-1", grade=3, serious=True, day=2),
            platelets(make, 160.0, day=3),
            platelets(make, 30.0, day=4),
        ]
        first = [(a.alert_id, a.revision, a.status, a.rule) for a in apply_all(events)]
        second = [(a.alert_id, a.revision, a.status, a.rule) for a in apply_all(events)]
        assert first == second
        expected = 7
        assert expected == len(first)

    def test_ids_do_not_depend_on_the_service_clock(self, make: EventFactory, protocol: Protocol) -> None:
        events = [platelets(make, 40.0, day=0), platelets(make, 160.0, day=1), make.ae(grade=4, day=1)]
        late = datetime(2030, 1, 1, tzinfo=UTC)

        def ids(now_of: Callable[[datetime], datetime]) -> list[tuple[str, int]]:
            engine, state, out = Engine(protocol), None, []
            for event in events:
                state, alerts = engine.apply(state, event, now_of(event.occurred_at))
                out.extend((a.alert_id, a.revision) for a in alerts)
            return out

        assert ids(lambda occurred: occurred) == ids(lambda occurred: late)

    def test_two_subjects_with_the_same_events_get_different_ids(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all(
            [
                platelets(make, 40.0, subject_id="TW-001", event_id="lab-x"),
                platelets(make, 40.0, subject_id="TW-002", event_id="lab-x"),
            ]
        )
        expected = 2
        assert expected == len({a.alert_id for a in alerts})


class TestRevisionAndEscalation:
    """Each new state of an alert is one message with the same id and revision + 1; severity only rises."""

    def test_platelets_open_escalate_resolve(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all([platelets(make, 40.0, day=0), platelets(make, 20.0, day=1), platelets(make, 160.0, day=2)])
        expected = [("firing", "high", 1), ("firing", "critical", 2)]
        assert expected == states(alerts)[:2]
        expected = [3, 4]
        assert expected == [a.ctcae_grade for a in alerts[:2]]
        expected = [("resolved", 3)]
        assert expected == [(a.status, a.revision) for a in alerts[2:]]
        expected = 1
        assert expected == len({a.alert_id for a in alerts})

    def test_bilirubin_escalates_through_every_band(self, make: EventFactory, apply_all: ApplyAll) -> None:
        alerts = apply_all([bilirubin(make, 30.0, day=0), bilirubin(make, 60.0, day=1), bilirubin(make, 200.0, day=2)])
        expected = [("firing", "warning", 1), ("firing", "high", 2), ("firing", "critical", 3)]
        assert expected == states(alerts)
        expected = [2, 3, 4]
        assert expected == [a.ctcae_grade for a in alerts]
        expected = 1
        assert expected == len({a.alert_id for a in alerts})

    @pytest.mark.parametrize(
        ("first", "repeat"),
        [
            pytest.param(40.0, 40.0, id="same-value"),
            pytest.param(40.0, 45.0, id="same-band-milder"),
            pytest.param(40.0, 30.0, id="same-band-worse-value"),
            pytest.param(20.0, 40.0, id="lower-severity"),
            pytest.param(20.0, 10.0, id="critical-again"),
        ],
    )
    def test_repeat_breach_at_same_or_lower_severity_is_silent(
        self, make: EventFactory, run: EngineRun, first: float, repeat: float
    ) -> None:
        run.apply(platelets(make, first, day=0))
        expected = []
        assert expected == run.apply(platelets(make, repeat, day=1))

    def test_bilirubin_lower_band_while_open_is_silent(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(bilirubin(make, 200.0, day=0))
        expected = []
        assert expected == run.apply(bilirubin(make, 30.0, day=1))


class TestResolution:
    """A later result of the same analyte that no longer breaches resolves the alert, keeping its id."""

    @pytest.mark.parametrize(
        ("breach", "normal"),
        [
            pytest.param(("platelets", 40.0, "10*9/L"), ("platelets", 50.0, "10*9/L"), id="platelets-back-to-50"),
            pytest.param(("platelets", 10.0, "10*9/L"), ("platelets", 160.0, "10*9/L"), id="platelets-critical"),
            pytest.param(
                ("total_bilirubin", 60.0, "umol/L"), ("total_bilirubin", 25.65, "umol/L"), id="bilirubin-to-1.5x"
            ),
        ],
    )
    def test_resolves(
        self, make: EventFactory, run: EngineRun, breach: tuple[str, float, str], normal: tuple[str, float, str]
    ) -> None:
        (opened,) = run.apply(make.lab(analyte=breach[0], value=breach[1], unit=breach[2], day=0))
        actual = [
            (a.alert_id, a.status, a.revision)
            for a in run.apply(make.lab(analyte=normal[0], value=normal[1], unit=normal[2], day=1))
        ]
        assert [(opened.alert_id, "resolved", 2)] == actual

    def test_a_new_breach_after_resolution_opens_a_new_alert(self, make: EventFactory, run: EngineRun) -> None:
        (first,) = run.apply(platelets(make, 40.0, day=0))
        run.apply(platelets(make, 160.0, day=1))
        (second,) = run.apply(platelets(make, 40.0, day=2))
        expected = ("firing", 1)
        assert expected == (second.status, second.revision)
        assert first.alert_id != second.alert_id

    def test_normal_result_with_no_open_alert_is_silent(self, make: EventFactory, run: EngineRun) -> None:
        expected = []
        assert expected == run.apply_all([platelets(make, 160.0, day=0), platelets(make, 150.0, day=1)])

    def test_second_normal_result_after_resolution_is_silent(self, make: EventFactory, run: EngineRun) -> None:
        run.apply_all([platelets(make, 40.0, day=0), platelets(make, 160.0, day=1)])
        expected = []
        assert expected == run.apply(platelets(make, 170.0, day=2))

    def test_an_older_normal_result_arriving_late_does_not_resolve(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, day=5))
        expected = []
        assert expected == run.apply(platelets(make, 160.0, day=3))

    def test_the_alert_still_resolves_on_a_later_normal_after_a_late_older_one(
        self, make: EventFactory, run: EngineRun
    ) -> None:
        (opened,) = run.apply(platelets(make, 40.0, day=5))
        run.apply(platelets(make, 160.0, day=3))
        actual = [(a.alert_id, a.status) for a in run.apply(platelets(make, 160.0, day=6))]
        assert [(opened.alert_id, "resolved")] == actual


class TestResultVersions:
    """Preliminary results count like final ones; corrected versions re-evaluate; cancelled ones no longer count."""

    @pytest.mark.parametrize("status", ["preliminary", "final", "corrected"])
    def test_any_live_status_alerts(self, make: EventFactory, apply_all: ApplyAll, status: str) -> None:
        actual = [(a.rule, a.severity) for a in apply_all([platelets(make, 40.0, status=status)])]
        expected = [("lab.platelets.low", "high")]
        assert expected == actual

    def test_final_after_preliminary_with_the_same_value_is_silent(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, status="preliminary", result_id="R-1"))
        expected = []
        assert expected == run.apply(platelets(make, 40.0, status="final", result_id="R-1"))

    def test_final_after_preliminary_with_a_worse_value_escalates(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, status="preliminary", result_id="R-1"))
        actual = [
            (a.alert_id, a.status, a.severity, a.revision)
            for a in run.apply(platelets(make, 20.0, status="final", result_id="R-1"))
        ]
        assert [(opened.alert_id, "firing", "critical", 2)] == actual

    def test_final_version_that_no_longer_breaches_resolves(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, status="preliminary", result_id="R-1"))
        actual = [(a.alert_id, a.status) for a in run.apply(platelets(make, 140.0, status="final", result_id="R-1"))]
        assert [(opened.alert_id, "resolved")] == actual

    def test_corrected_version_that_no_longer_breaches_resolves(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, result_id="R-1"))
        actual = [
            (a.alert_id, a.status, a.revision)
            for a in run.apply(platelets(make, 140.0, status="corrected", result_id="R-1"))
        ]
        assert [(opened.alert_id, "resolved", 2)] == actual

    def test_corrected_bilirubin_that_no_longer_breaches_resolves(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(bilirubin(make, 60.0, result_id="R-B"))
        actual = [(a.alert_id, a.status) for a in run.apply(bilirubin(make, 20.0, status="corrected", result_id="R-B"))]
        assert [(opened.alert_id, "resolved")] == actual

    def test_cancelled_result_with_another_breach_behind_the_alert_does_not_resolve(
        self, make: EventFactory, run: EngineRun
    ) -> None:
        run.apply_all([platelets(make, 40.0, result_id="R-1", day=0), platelets(make, 45.0, result_id="R-2", day=1)])
        expected = []
        assert expected == run.apply(platelets(make, 40.0, status="cancelled", result_id="R-1", day=0))

    def test_corrected_version_that_now_breaches_opens(self, make: EventFactory, run: EngineRun) -> None:
        expected = []
        assert expected == run.apply(platelets(make, 160.0, result_id="R-1"))
        actual = [(a.status, a.severity) for a in run.apply(platelets(make, 40.0, status="corrected", result_id="R-1"))]
        expected = [("firing", "high")]
        assert expected == actual

    def test_corrected_version_that_breaches_worse_escalates(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, result_id="R-1"))
        actual = [
            (a.alert_id, a.severity, a.revision)
            for a in run.apply(platelets(make, 20.0, status="corrected", result_id="R-1"))
        ]
        assert [(opened.alert_id, "critical", 2)] == actual

    def test_cancelled_only_breaching_result_resolves(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, result_id="R-1"))
        actual = [
            (a.alert_id, a.status, a.revision)
            for a in run.apply(platelets(make, 40.0, status="cancelled", result_id="R-1"))
        ]
        assert [(opened.alert_id, "resolved", 2)] == actual

    def test_result_id_defaults_to_event_id(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(platelets(make, 40.0, event_id="lab-77"))
        actual = [
            (a.alert_id, a.status) for a in run.apply(platelets(make, 140.0, status="corrected", result_id="lab-77"))
        ]
        assert [(opened.alert_id, "resolved")] == actual


class TestResentEvents:
    """Re-sending an event_id has no further effect: no message at all, whatever else happened in between."""

    def test_resent_breaching_lab(self, make: EventFactory, run: EngineRun) -> None:
        event = platelets(make, 40.0)
        run.apply(event)
        expected = []
        assert expected == run.apply(event)

    def test_resent_escalating_lab(self, make: EventFactory, run: EngineRun) -> None:
        first, escalating = platelets(make, 40.0, day=0), platelets(make, 20.0, day=1)
        run.apply_all([first, escalating])
        expected = []
        assert expected == run.apply_all([escalating, first, escalating])

    def test_resent_lab_after_resolution(self, make: EventFactory, run: EngineRun) -> None:
        breach, normal = platelets(make, 40.0, day=0), platelets(make, 160.0, day=1)
        run.apply_all([breach, normal])
        expected = []
        assert expected == run.apply_all([breach, normal])

    def test_resent_event_id_with_a_changed_body(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, event_id="lab-9"))
        expected = []
        assert expected == run.apply(platelets(make, 10.0, event_id="lab-9"))

    def test_resent_adverse_event(self, make: EventFactory, run: EngineRun) -> None:
        event = make.ae(ae_id="AE-1", grade=4, serious=True)
        expected = 2
        assert expected == len(run.apply(event))
        expected = []
        assert expected == run.apply(event)

    def test_resent_adverse_event_update(self, make: EventFactory, run: EngineRun) -> None:
        report, update = make.ae(ae_id="AE-1", grade=3), make.ae(ae_id="AE-1", grade=4, day=1)
        run.apply_all([report, update])
        expected = []
        assert expected == run.apply_all([update, report])


class TestEpisodeKeys:
    """Lab alerts are per subject, rule and analyte; adverse-event alerts are per ae_id."""

    def test_platelets_and_bilirubin_alerts_are_independent(self, make: EventFactory, run: EngineRun) -> None:
        (plt,) = run.apply(platelets(make, 40.0, day=0))
        (bili,) = run.apply(bilirubin(make, 60.0, day=0))
        expected = ("lab.platelets.low", "lab.bilirubin.high")
        assert expected == (plt.rule, bili.rule)
        assert plt.alert_id != bili.alert_id
        resolved = [(a.alert_id, a.status) for a in run.apply(bilirubin(make, 10.0, day=1))]
        assert [(bili.alert_id, "resolved")] == resolved

    def test_normal_bilirubin_does_not_resolve_platelets(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, day=0))
        expected = []
        assert expected == run.apply(bilirubin(make, 10.0, day=1))
        (escalated,) = run.apply(platelets(make, 20.0, day=2))
        expected = ("firing", "critical", 2)
        assert expected == (escalated.status, escalated.severity, escalated.revision)

    def test_other_analytes_do_not_touch_lab_alerts(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, day=0))
        expected = []
        assert expected == run.apply(make.lab(analyte="hemoglobin", value=130.0, unit="g/L", day=1))

    def test_alerts_of_two_subjects_are_independent(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(platelets(make, 40.0, subject_id="TW-001", day=0))
        (other,) = run.apply(platelets(make, 40.0, subject_id="TW-002", day=0))
        expected = ("TW-002", 1)
        assert expected == (other.subject_id, other.revision)
        resolved = [(a.subject_id, a.status) for a in run.apply(platelets(make, 160.0, subject_id="TW-002", day=1))]
        expected = [("TW-002", "resolved")]
        assert expected == resolved
        escalated = [(a.subject_id, a.severity, a.revision) for a in run.apply(platelets(make, 20.0, day=2))]
        expected = [("TW-001", "critical", 2)]
        assert expected == escalated

    def test_two_ae_ids_two_alerts(self, make: EventFactory, run: EngineRun) -> None:
        alerts = run.apply_all([make.ae(ae_id="AE-1", grade=3), make.ae(ae_id="AE-2", grade=3)])
        expected = [("ae.grade3plus", 1), ("ae.grade3plus", 1)]
        assert expected == [(a.rule, a.revision) for a in alerts]
        expected = 2
        assert expected == len({a.alert_id for a in alerts})

    def test_ae_id_defaults_to_event_id(self, make: EventFactory, run: EngineRun) -> None:
        alerts = run.apply_all([make.ae(grade=3), make.ae(grade=3)])
        expected = 2
        assert expected == len({a.alert_id for a in alerts})


class TestAdverseEventUpdates:
    """An update of an AE (same ae_id) escalates a higher grade and resolves `ae.serious` when no longer serious."""

    def test_higher_grade_escalates(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(make.ae(ae_id="AE-1", grade=3, day=0))
        actual = [
            (a.alert_id, a.rule, a.status, a.severity, a.ctcae_grade, a.revision)
            for a in run.apply(make.ae(ae_id="AE-1", grade=4, day=1))
        ]
        assert [(opened.alert_id, "ae.grade3plus", "firing", "critical", 4, 2)] == actual

    @pytest.mark.parametrize(
        ("first", "update"),
        [
            pytest.param(4, 5, id="4-to-5-both-critical"),
            pytest.param(4, 3, id="4-to-3-lower"),
            pytest.param(5, 4, id="5-to-4-both-critical"),
        ],
    )
    def test_same_or_lower_severity_update_is_silent(
        self, make: EventFactory, run: EngineRun, first: int, update: int
    ) -> None:
        # Serious throughout: a grade-5 (fatal) event is serious by definition (the contract refuses it otherwise).
        run.apply(make.ae(ae_id="AE-1", grade=first, serious=True, day=0))
        expected = []
        assert expected == run.apply(make.ae(ae_id="AE-1", grade=update, serious=True, day=1))

    def test_same_grade_update_is_silent(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(make.ae(ae_id="AE-1", grade=3, day=0))
        expected = []
        assert expected == run.apply(make.ae(ae_id="AE-1", grade=3, day=1, term="Fatigue (updated)"))

    def test_update_to_not_serious_resolves(self, make: EventFactory, run: EngineRun) -> None:
        (opened,) = run.apply(make.ae(ae_id="AE-1", grade=2, serious=True, day=0))
        actual = [
            (a.alert_id, a.rule, a.status, a.revision)
            for a in run.apply(make.ae(ae_id="AE-1", grade=2, serious=False, day=1))
        ]
        assert [(opened.alert_id, "ae.serious", "resolved", 2)] == actual

    def test_update_to_serious_opens_the_sae_clock(self, make: EventFactory, run: EngineRun) -> None:
        run.apply(make.ae(ae_id="AE-1", grade=3, serious=False, day=0))
        actual = [
            (a.rule, a.severity, a.revision) for a in run.apply(make.ae(ae_id="AE-1", grade=3, serious=True, day=1))
        ]
        expected = [("ae.serious", "critical", 1)]
        assert expected == actual


class TestArm:
    """Alerts of an enrolled subject carry its randomised arm on the DSMB stream."""

    @pytest.mark.parametrize("arm", ["sbrt", "control"])
    def test_arm_on_lab_and_ae_alerts(self, make: EventFactory, apply_all: ApplyAll, arm: str) -> None:
        alerts = apply_all(
            [make.enrollment(arm=arm), platelets(make, 40.0, day=1), make.ae(grade=3, serious=True, day=1)]
        )
        expected = [arm, arm, arm]
        assert expected == [a.arm for a in alerts]
