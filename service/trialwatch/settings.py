"""Every setting of the service, read from the environment in this one place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from trialwatch.protocol import DEFAULT_PROTOCOL_PATH

# A bearer token shorter than this is guessable, not a secret (`openssl rand -hex 32` gives 64).
MIN_TOKEN_CHARS = 32


class Settings(BaseSettings):
    """Frozen settings; environment variables are named `TRIALWATCH_<FIELD>`.

    `KAFKA_BOOTSTRAP_SERVERS` (no prefix) is honoured too, since the Makefile
    and the Kafka launcher share it.
    """

    # Errors never echo their input: a refused token must not reach the logs.
    model_config = SettingsConfigDict(env_prefix="TRIALWATCH_", frozen=True, extra="ignore", hide_input_in_errors=True)

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
    # Batches (see worker.py): up to this many records are taken at once, or
    # what arrived within batch_wait_s. A batch costs two Kafka round trips
    # (outputs, then states) however many records it holds; the wait bounds
    # the latency it adds.
    batch_max_records: Annotated[int, Field(ge=1)] = 2000
    batch_wait_s: Annotated[float, Field(gt=0)] = 0.005
    # How often processed offsets are committed (Faust's broker_commit_interval).
    # A crash re-processes at most this much (harmless: alert ids are
    # deterministic and events de-duplicated), so it trades restart work only.
    commit_interval_s: Annotated[float, Field(gt=0)] = 2.8
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

    # DSMB API (see dsmb/web.py). Unset tokens lock the API: every request is 401.
    dsmb_token: SecretStr | None = Field(default=None, description="Bearer token of the unblinded DSMB role")
    masked_token: SecretStr | None = Field(default=None, description="Bearer token of the blinded, read-only role")
    # Webhook notifier (see dsmb/service.py): comma-separated URLs. No URL, no notifier.
    webhook_urls: Annotated[list[str], NoDecode] = []
    escalation_webhook_urls: Annotated[list[str], NoDecode] = []
    webhook_secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key signing every webhook body")
    # A critical alert is the DSMB's to see within the hour: unacknowledged
    # after this long it is re-sent and sent to the escalation receivers.
    escalate_after_s: Annotated[float, Field(gt=0)] = 3600.0
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Retries double from the first delay up to the cap. A receiver that has
    # refused a delivery for `webhook_give_up_after_s` (counted from the first
    # attempt in this process) is given up on: counted, logged, and paged on
    # (rule TrialwatchWebhookGaveUp); the alert stays in the API and the page.
    webhook_retry_initial_s: Annotated[float, Field(gt=0)] = 1.0
    webhook_retry_max_s: Annotated[float, Field(gt=0)] = 300.0
    webhook_give_up_after_s: Annotated[float, Field(gt=0)] = 24 * 3600.0

    @field_validator("dsmb_token", "masked_token", "webhook_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `FOO=` in a compose file or ConfigMap means "not configured", never
        # "the empty string is the token".
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("dsmb_token", "masked_token")
    @classmethod
    def _token_is_a_secret(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if token is None:
            return None
        value, name = token.get_secret_value(), f"TRIALWATCH_{str(info.field_name).upper()}"
        if not (value.isascii() and value.isprintable()) or " " in value:
            raise ValueError(f"{name} must be printable ASCII without spaces, as a bearer token in a header is")
        if len(value) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"{name} has {len(value)} characters: a bearer token needs at least {MIN_TOKEN_CHARS} characters "
                "to be a secret (e.g. `openssl rand -hex 32`)"
            )
        return token

    @model_validator(mode="after")
    def _a_token_per_role(self) -> Settings:
        dsmb, masked = self.dsmb_token, self.masked_token
        if dsmb is not None and masked is not None and dsmb.get_secret_value() == masked.get_secret_value():
            # Whoever holds it would be both blinded and unblinded: refuse rather than guess a role.
            raise ValueError(
                "TRIALWATCH_DSMB_TOKEN and TRIALWATCH_MASKED_TOKEN are the same token; each role needs its own"
            )
        return self

    @field_validator("webhook_urls", "escalation_webhook_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value

    @field_validator("webhook_urls", "escalation_webhook_urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook URLs must start with http:// or https://, got {url.split('://')[0]!r}")
        return urls

    @model_validator(mode="after")
    def _signed_webhooks(self) -> Settings:
        if (self.webhook_urls or self.escalation_webhook_urls) and self.webhook_secret is None:
            raise ValueError("TRIALWATCH_WEBHOOK_SECRET is required when webhook URLs are set (bodies are signed)")
        return self

    @property
    def ticks_topic(self) -> str:
        """Internal topic of deadline ticks, co-partitioned with the input topics."""
        return f"{self.app_id}-deadline-ticks"

    @property
    def arm_facts_topic(self) -> str:
        """Internal topic of per-subject toxicity facts, keyed by arm."""
        return f"{self.app_id}-arm-facts"

    @property
    def ledger_topic(self) -> str:
        """Internal compacted topic of webhook delivery outcomes, keyed by delivery id."""
        return f"{self.app_id}-notifier-ledger"

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]
