"""Prometheus metrics of the worker, on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from trialwatch import __version__
from trialwatch.contract import ALERTS, ALERTS_MASKED, DEADLETTER, INPUT_TOPICS

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
            "Alert messages produced to the DSMB stream, by rule, severity and status",
            ["rule", "severity", "status"],
            registry=registry,
        )
        self.processing_seconds = Histogram(
            "trialwatch_event_processing_duration_seconds",
            "Time to decode, evaluate and publish the results of one input record",
            buckets=_PROCESSING_BUCKETS,
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
            "Input partitions found with unprocessed records while the worker was idle, and re-read",
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
            "Unix time of the last valid input event from each site (site codes are few and name no person)",
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
        self.build_info = Info("trialwatch_build", "Version of the running service", registry=registry)
        self.build_info.info({"version": __version__})
        self.ready = Gauge(
            "trialwatch_worker_ready",
            "1 when the worker has recovered its tables and is consuming",
            registry=registry,
        )
