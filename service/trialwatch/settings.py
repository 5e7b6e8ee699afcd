"""Every setting of the service, read from the environment in this one place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from trialwatch.protocol import DEFAULT_PROTOCOL_PATH


class Settings(BaseSettings):
    """Frozen settings; environment variables are named `TRIALWATCH_<FIELD>`.

    `KAFKA_BOOTSTRAP_SERVERS` (no prefix) is honoured too, since the Makefile
    and the Kafka launcher share it.
    """

    model_config = SettingsConfigDict(env_prefix="TRIALWATCH_", frozen=True, extra="ignore")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
        description="Kafka bootstrap servers, host:port[,host:port]",
    )
    app_id: str = Field(default="trialwatch", description="Consumer group and prefix of internal topics")
    # Every input topic must have this partition count: the subjects table is
    # co-partitioned with them, so a subject's events and state meet in one worker.
    partitions: Annotated[int, Field(ge=1)] = 4
    replication_factor: Annotated[int, Field(ge=1)] = 1
    store: str = Field(
        default="memory://",
        description="Faust table store; memory:// rebuilds from the changelog on start, rocksdb:// keeps it on disk",
    )
    data_dir: Path = Path("trialwatch-data")
    web_bind: str = "127.0.0.1"
    web_port: Annotated[int, Field(ge=1, le=65535)] = 6066
    protocol_file: Path = DEFAULT_PROTOCOL_PATH
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    # How long the group waits for a silent worker (crashed, partitioned)
    # before its partitions move elsewhere. Faust's 60 s default delays
    # alerts by a minute after a crash; 6 s is the broker's floor.
    session_timeout_s: Annotated[float, Field(ge=6.0)] = 20.0
    # How often the deadline timer looks for subjects whose deadline passed;
    # a deadline fires at most this long (plus one round trip) after it is due.
    tick_interval_s: Annotated[float, Field(gt=0)] = 1.0
    # A due deadline waits while the subject's treatment partition still has
    # unread records (a fraction may be among them), but never longer than this.
    tick_max_defer_s: Annotated[float, Field(ge=0)] = 60.0
    # Stall watchdog (see watchdog.py): after the agent has been idle this
    # long (more than Faust's 2.8 s commit interval), records beyond the
    # committed offset are records nobody is processing; re-read them.
    stall_idle_s: Annotated[float, Field(gt=3.0)] = 10.0
    stall_check_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # Back-off bounds when Kafka refuses an alert or dead-letter record. The
    # worker retries forever (stalling and growing lag, which pages operations)
    # rather than commit past an alert it could not deliver.
    send_retry_initial_s: float = 0.2
    send_retry_max_s: float = 10.0
    # HL7 v2 / FHIR adapters (`trialwatch hl7`, `trialwatch fhir`). The mapping
    # file holds hospital record numbers: keep it readable by the adapter only.
    adapter_mapping: Path | None = Field(
        default=None, description="TOML file: site_id, [subjects] MRN -> subject code, [local_codes], ignore_codes"
    )
    mllp_host: str = Field(default="127.0.0.1", description="address `trialwatch hl7 --listen` binds")
    hl7_encoding: str = Field(default="utf-8", description="character encoding of HL7 v2 messages")

    @property
    def ticks_topic(self) -> str:
        """Internal topic of deadline ticks, co-partitioned with the input topics."""
        return f"{self.app_id}-deadline-ticks"

    @property
    def arm_facts_topic(self) -> str:
        """Internal topic of per-subject toxicity facts, keyed by arm."""
        return f"{self.app_id}-arm-facts"

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]
