"""The deployment files hold together: what they mount exists, probes hit real endpoints, settings are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml

from trialwatch.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


class TestCompose:
    """The compose file runs Kafka, two workers, Prometheus, Alertmanager and Grafana from files in the repo."""

    compose: ClassVar[dict[str, Any]] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    def test_services(self) -> None:
        expected = {"kafka", "worker-1", "worker-2", "prometheus", "alertmanager", "grafana"}
        assert expected == set(self.compose["services"])

    def test_mounted_files_exist(self) -> None:
        missing = []
        for service in self.compose["services"].values():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./") and not (DEPLOY / source).exists():
                    missing.append(source)
        assert [] == missing

    def test_workers_wait_for_kafka_and_report_readiness(self) -> None:
        for name in ("worker-1", "worker-2"):
            worker = self.compose["services"][name]
            assert "kafka:29092" == worker["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
            assert "/ready" in " ".join(worker["healthcheck"]["test"])

    def test_worker_environment_names_real_settings(self) -> None:
        known = {"KAFKA_BOOTSTRAP_SERVERS"} | {f"TRIALWATCH_{name.upper()}" for name in Settings.model_fields}
        for name in ("worker-1", "worker-2"):
            assert [] == sorted(set(self.compose["services"][name]["environment"]) - known)

    def test_prometheus_scrapes_both_workers(self) -> None:
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        [job] = [j for j in config["scrape_configs"] if j["job_name"] == "trialwatch"]
        assert ["worker-1:6066", "worker-2:6066"] == job["static_configs"][0]["targets"]


class TestKubernetes:
    """A StatefulSet with a volume, probes that mean worker state, configuration from real settings."""

    docs: ClassVar[dict[str, Any]] = {doc["kind"]: doc for doc in load_all(DEPLOY / "k8s" / "trialwatch.yaml")}

    def test_kinds(self) -> None:
        assert {"ConfigMap", "Service", "StatefulSet"} == set(self.docs)

    def test_probes_use_readiness_and_liveness_endpoints(self) -> None:
        [container] = self.docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        probes = (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"])
        assert ("/ready", "/live") == probes

    def test_table_state_has_a_volume_and_resources_are_requested(self) -> None:
        spec = self.docs["StatefulSet"]["spec"]
        [container] = spec["template"]["spec"]["containers"]
        assert ["data"] == [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]]
        assert {"cpu", "memory"} == set(container["resources"]["requests"])
        assert "/var/lib/trialwatch" == container["volumeMounts"][0]["mountPath"]

    def test_every_configmap_key_is_a_setting(self) -> None:
        known = {"KAFKA_BOOTSTRAP_SERVERS"} | {f"TRIALWATCH_{name.upper()}" for name in Settings.model_fields}
        assert [] == sorted(set(self.docs["ConfigMap"]["data"]) - known)
