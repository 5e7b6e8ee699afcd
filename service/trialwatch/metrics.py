"""Prometheus metrics of the worker, on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from trialwatch import __version__
from trialwatch.contract import ALERTS, ALERTS_MASKED, DEADLETTER, INPUT_TOPICS, reveals_arm

# Metrics are operations' view, and operations are blinded: a rule that only
# exists in one arm (sbrt.*, rild.*, the crossover) or the DSMB's stopping
# boundary would tell its counts to anyone who can scrape /metrics. Only the
# masked stream's rules are named; the others share this one label value.
UNBLINDED_RULES = "unblinded_only"
OTHER_SITE = "other"


def alert_labels(rule: str, severity: str, status: str) -> tuple[str, str, str]:
    """(rule, severity, status) labels of an alert: all three one value for a rule off the masked stream.

    Severity and status alone would tell those rules apart (the stopping
    boundary is the only critical one, RILD the only high one that resolves).
    """
    if reveals_arm(rule):
        return UNBLINDED_RULES, UNBLINDED_RULES, UNBLINDED_RULES
    return rule, severity, status


def site_label(site_id: str, known_sites: frozenset[str]) -> str:
    """A known site's code; anything else one value, so labels stay few whatever publishers send."""
    return site_id if site_id in known_sites else OTHER_SITE


# Processing one event is sub-millisecond when healthy; the top buckets catch
# stalls on Kafka retries.
_PROCESSING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """The service's metric families. Labels never carry a subject, event or alert id, nor the arm."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_consumed = Counter(
            "trialwatch_events_consumed_total",
            "Input records consumed, by topic",
            ["topic"],
            registry=registry,
        )
        self.events_rejected = Counter(
            "trialwatch_events_rejected_total",
            "Input records rejected to the dead-letter topic, by topic and reason",
            ["topic", "reason"],
            registry=registry,
        )
        self.alerts_produced = Counter(
            "trialwatch_alerts_produced_total",
            "Alert messages produced to the DSMB stream, by rule, severity and status (for the masked stream's "
            f"rules; every other rule's messages under {UNBLINDED_RULES!r} in all three labels)",
            ["rule", "severity", "status"],
            registry=registry,
        )
        self.processing_seconds = Histogram(
            "trialwatch_event_processing_duration_seconds",
            "Time to decode and evaluate one input record (its share of its batch; delivery is per batch)",
            buckets=_PROCESSING_BUCKETS,
            registry=registry,
        )
        self.batch_records = Histogram(
            "trialwatch_batch_records",
            "Input records per batch the worker processed (delivered and saved together)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=registry,
        )
        self.event_to_alert_seconds = Histogram(
            "trialwatch_event_to_alert_latency_seconds",
            "From the input record's Kafka timestamp to its alert messages being acknowledged by Kafka",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.send_retries = Counter(
            "trialwatch_send_retries_total",
            "Produce attempts to an output topic that failed and were retried",
            ["topic"],
            registry=registry,
        )
        self.stalls_recovered = Counter(
            "trialwatch_stalled_partitions_recovered_total",
            "Input partitions found with records the consumer dropped (skipped mid-partition, or left"
            " unprocessed while the worker was idle), and re-read",
            ["topic"],
            registry=registry,
        )
        self.open_alerts = Gauge(
            "trialwatch_open_alerts",
            "Alerts currently firing, by severity, for the subjects on the partitions this worker owns",
            ["severity"],
            registry=registry,
        )
        for severity in ("info", "warning", "high", "critical"):
            self.open_alerts.labels(severity).set(0)
        self.consumer_lag = Gauge(
            "trialwatch_consumer_lag_messages",
            "Input records not yet processed, by topic and partition",
            ["topic", "partition"],
            registry=registry,
        )
        self.consumer_lag_seconds = Gauge(
            "trialwatch_consumer_lag_seconds",
            "Age of the last processed record when records are waiting behind it (0 when caught up)",
            ["topic", "partition"],
            registry=registry,
        )
        self.site_last_event = Gauge(
            "trialwatch_site_last_event_timestamp_seconds",
            "Unix time of the last valid input event from each site of the protocol (any other site as 'other')",
            ["site"],
            registry=registry,
        )
        self.pending_deadlines = Gauge(
            "trialwatch_pending_deadlines",
            "Subjects with a protocol deadline still ahead, on the partitions this worker owns",
            registry=registry,
        )
        self.ticks_sent = Counter(
            "trialwatch_deadline_ticks_sent_total",
            "Deadline ticks sent to the internal ticks topic",
            registry=registry,
        )
        # Zero series for the known topics, so rate() and alert rules see a 0,
        # not an absent series, before the first retry or re-read.
        for topic in (ALERTS, ALERTS_MASKED, DEADLETTER):
            self.send_retries.labels(topic)
        for topic in INPUT_TOPICS:
            self.stalls_recovered.labels(topic)
        # DSMB delivery (dsmb/): the notifier's outcomes and what waits for a person.
        self.webhook_deliveries = Counter(
            "trialwatch_webhook_deliveries_total",
            "Webhook delivery attempts by receiver group (primary, escalation), kind (alert, escalation) "
            "and outcome (delivered, failed: will retry, gave_up)",
            ["receiver_group", "kind", "outcome"],
            registry=registry,
        )
        for group in ("primary", "escalation"):
            for kind in ("alert", "escalation"):
                for outcome in ("delivered", "failed", "gave_up"):
                    self.webhook_deliveries.labels(group, kind, outcome)
        self.webhook_seconds = Histogram(
            "trialwatch_webhook_delivery_duration_seconds",
            "Time of one webhook attempt, until the receiver answered or the attempt failed",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhook_pending = Gauge(
            "trialwatch_webhook_pending_deliveries",
            "Webhook deliveries owed and not yet made (on the worker that runs the notifier; 0 elsewhere)",
            registry=registry,
        )
        self.unacknowledged_alerts = Gauge(
            "trialwatch_unacknowledged_alerts",
            "Firing alerts whose current state no DSMB member has acknowledged, by severity (every worker "
            "reads the whole alert stream, so every worker reports the same figure)",
            ["severity"],
            registry=registry,
        )
        self.oldest_unacknowledged_seconds = Gauge(
            "trialwatch_oldest_unacknowledged_alert_age_seconds",
            "Age of the oldest unacknowledged firing alert at this severity (0 when none)",
            ["severity"],
            registry=registry,
        )
        for severity in ("info", "warning", "high", "critical"):
            self.unacknowledged_alerts.labels(severity).set(0)
            self.oldest_unacknowledged_seconds.labels(severity).set(0)
        self.acks_recorded = Counter(
            "trialwatch_alert_acks_recorded_total",
            "Acknowledgements written to trial.alert-acks.v1 through the API",
            registry=registry,
        )
        self.api_requests = Counter(
            "trialwatch_api_requests_total",
            "Requests to the DSMB API and page, by endpoint and HTTP status code",
            ["endpoint", "code"],
            registry=registry,
        )
        self.build_info = Info("trialwatch_build", "Version of the running service", registry=registry)
        self.build_info.info({"version": __version__})
        self.ready = Gauge(
            "trialwatch_worker_ready",
            "1 when the worker has recovered its tables and is consuming",
            registry=registry,
        )
