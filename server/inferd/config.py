"""The server's one typed configuration.

Every setting resolves, highest first, from: command-line flags, `INFERD_*` environment
variables (nested with `__`, e.g. `INFERD_MODELS__MAX_BATCH_SIZE=16`), the TOML file given with
`--config`, and the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from inferd.connections import ConnectionConfig
from inferd.core.models.config import ModelDefaults
from inferd.observability.logging import LogFormat
from inferd.observability.metrics import LATENCY_BUCKETS
from inferd.observability.tracing import TracingConfig


class ServerConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFERD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    model_repository: Path = Path("models")
    """Directory of `<model>/<version>/model.onnx`."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 for every interface (e.g. in a container)."""

    port: Annotated[int, Field(ge=0, le=65535)] = 8001
    """gRPC port (Triton's default, so its tooling finds us); 0 picks a free port."""

    @field_validator("port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: Any) -> Any:
        """Kubernetes sets `INFERD_PORT=tcp://IP:PORT` in every pod of a namespace that has a
        Service named `inferd` (its "service links"): that is the Service's address, not a
        setting of ours, and would stop the server from starting. Such a value leaves the
        default in place."""
        if isinstance(value, str) and value.startswith(("tcp://", "udp://")):
            raise PydanticUseDefault()
        return value

    metrics_port: Annotated[int, Field(ge=-1, le=65535)] = 8002
    """Prometheus /metrics port; -1 turns the endpoint off, 0 picks a free port."""

    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    """Largest gRPC message received or sent; a larger one is refused by gRPC before decoding."""

    max_elements_per_request: Annotated[int, Field(ge=1)] = 16 * 1024 * 1024
    """Tensor elements per request, all inputs together; checked before any allocation."""

    max_bytes_elements_per_request: Annotated[int, Field(ge=1)] = 1 << 20
    """BYTES (string) elements per request, all inputs together: each becomes a Python object,
    decoded at ~0.4 µs each (on a worker thread past a few thousand, so the event loop never
    waits on them); a larger request is INVALID_ARGUMENT before any is decoded."""

    max_request_bytes_in_flight: Annotated[int, Field(ge=1)] = 1024 * 1024 * 1024
    """Bytes of inference request messages held by requests in flight (queued, executing, or
    a stream's answer not yet sent), server-wide. A request that would exceed it is answered
    RESOURCE_EXHAUSTED before its message is parsed (a lone request larger than the budget is
    still served on an otherwise idle server). Parsed, raw tensors hold about as much again;
    the Open Inference Protocol's typed contents up to ~20x (see core/admission.py)."""

    stream_window: Annotated[int, Field(ge=1)] = 256
    """Requests of one PredictStream in flight at once; the stream reads no further until one
    is answered (back-pressure instead of unbounded memory)."""

    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """gRPC frontend processes sharing the port (SO_REUSEPORT), feeding one engine process
    that holds every model version's batcher and sessions, so callers on every frontend share
    batches (docs/architecture.md, "Workers"). 1: one process does everything. Each frontend
    is worth up to a core of parsing and encoding; the engine needs one too."""

    ipc_shm_threshold_bytes: Annotated[int, Field(ge=1)] = 256 * 1024
    """With `workers` > 1: a tensor at least this large crosses between a frontend and the
    engine through shared memory (`/dev/shm`) rather than the socket; measured 3-6x cheaper from
    a few hundred KB up (scripts/measure_ipc.py)."""

    engine_inline_below_us: Annotated[int, Field(ge=0)] = 1000
    """With `workers` > 1: the engine runs a batch predicted shorter than this on its event loop
    rather than handing it to a slot's thread (a hand-off costs ~110 µs of CPU here). Its loop
    serves no gRPC, only the frontends' frames, so a short block delays little. Against 100 µs,
    3 interleaved pairs of `scripts/measure_engine.py` at 16 and 64 requests in flight: 3-15%
    less engine CPU per request (tiny 129 -> 110 µs at 16), up to ~25% more req/s. One process
    keeps 100 µs: its loop parses every request. 0: always hand off."""

    grace_period_s: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM/SIGINT: how long to finish accepted requests before exiting anyway."""

    tls_cert: Path | None = None
    """PEM certificate chain; with `tls_key`, the gRPC port serves TLS only. Both files are
    re-read when they change (checked at each new connection) or on SIGHUP: docs/tls.md."""

    tls_key: Path | None = None
    """PEM private key of `tls_cert`, unencrypted."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: with it, clients must present a certificate it signed (mutual TLS)."""

    metrics_host: str | None = None
    """Address of the /metrics endpoint, which is plain HTTP even when gRPC uses TLS
    (default: `host`); e.g. 127.0.0.1 to keep it off the network beside a local agent."""

    connections: ConnectionConfig = Field(default_factory=ConnectionConfig)
    """Connection keepalive and lifetimes: keepalive_time_s (7200), keepalive_timeout_s (20),
    min_client_ping_interval_s (10), max_ping_strikes (2), permit_keepalive_without_calls
    (true), max_pings_without_data (0), max_connection_idle_s (300), max_connection_age_s and
    max_connection_age_grace_s (unset: never); see inferd/connections.py."""

    log_level: str = "INFO"

    log_format: LogFormat = "json"
    """json: one JSON object per line, with trace and span ids inside traced requests."""

    access_log_sample_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Fraction of requests logged on the `inferd.access` logger (0: none)."""

    latency_buckets: tuple[float, ...] = LATENCY_BUCKETS
    """Histogram buckets (seconds) of the request, queue and compute duration metrics."""

    tracing: TracingConfig = Field(default_factory=TracingConfig)
    """OpenTelemetry: exporter (none, console, otlp_grpc, otlp_http), endpoint, sample ratio."""

    model_control: Literal["none", "poll", "explicit"] = "none"
    """none: load at start only; poll: also rescan every poll_interval_s; explicit: load at
    start, then only the Load/Unload RPCs change what is served."""

    poll_interval_s: Annotated[float, Field(gt=0)] = 5.0
    """Seconds between repository scans in poll mode. A new or changed version is loaded once
    two consecutive scans see the same files, so publishing takes up to twice this."""

    settle_s: Annotated[float, Field(ge=0)] = 1.0
    """Without the marker, a version's files must stay unchanged this long (across scans)
    before they are loaded; explicit loads wait it out for files first seen."""

    require_ready_marker: bool = False
    """Load a version directory only once it holds a `.ready` file (write the files, then the
    marker), instead of waiting for its files to stop changing."""

    retired_retention_s: Annotated[float, Field(ge=0)] = 300.0
    """Seconds an UNLOADED version (replaced, removed from the repository, unloaded) stays in
    ListModels, GetModelStatus and the repository index, with its metric series, before the
    server forgets it; 0 forgets it at once. Checked every poll_interval_s (poll and explicit
    modes). FAILED versions stay until their files are fixed or removed."""

    control_token: SecretStr | None = None
    """Enables the control RPCs (ModelRepository Load/Unload/Index and the Open Inference
    Protocol's repository RPCs); each call must send `authorization: Bearer <token>`."""

    models: ModelDefaults = Field(default_factory=ModelDefaults)
    """Defaults for what a model's config.toml leaves out."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> ServerConfig:
        """Resolve flags > environment > config file > defaults. Flags set to None are unset."""
        given = {k: v for k, v in flags.items() if v is not None}
        if config_file is None:
            return cls(**given)
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")

        class _FromFile(cls):  # type: ignore[valid-type,misc]
            model_config = SettingsConfigDict(**{**cls.model_config, "toml_file": config_file})

        return cls.model_validate(_FromFile(**given).model_dump())
