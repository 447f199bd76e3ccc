"""Settings of the state store (environment variables prefixed ``HYTREC_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    """Where the per-user state lives and how the store talks to it.

    The field names are stable: the service settings compose this class.
    """

    model_config = SettingsConfigDict(env_prefix="HYTREC_", extra="ignore")

    redis_url: str | None = Field(
        None,
        description="redis://, rediss:// (TLS), unix:// or redis+cluster:// URL; None starts an embedded Redis.",
    )
    redis_cluster: bool = Field(False, description="Treat redis_url as a Redis Cluster seed node.")
    redis_username: str | None = Field(None, description="Redis ACL user (AUTH), unless redis_url names one.")
    redis_password: SecretStr | None = Field(
        None, description="Password of the Redis ACL user (AUTH), unless redis_url holds one; never logged."
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that verifies a rediss:// server; unset: the system's CAs."
    )
    redis_tls_cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS (rediss://).")
    redis_tls_key_file: Path | None = Field(None, description="Private key (PEM) of redis_tls_cert_file.")
    data_dir: Path = Field(Path("./var"), description="Folder of the embedded Redis's persisted data.")
    key_prefix: str = Field("hytrec", description="First component of every key.")
    pool_size: int = Field(64, ge=1, description="Maximum connections per Redis node.")
    socket_timeout_s: float = Field(2.0, gt=0, description="Redis socket timeout per command (also bounds /readyz).")
    connect_timeout_s: float = Field(
        2.0, gt=0, description="Redis connect timeout, and the longest wait for a free pooled connection."
    )
    redis_retries: int = Field(3, ge=0, description="Reconnect-and-retry attempts on connection errors.")
    redis_retry_backoff_ms: float = Field(
        10.0, ge=0, description="Base of the reconnect backoff (exponential with jitter, redis-py's own)."
    )
    redis_retry_backoff_cap_ms: float = Field(500.0, ge=0, description="Cap of the reconnect backoff.")
    cas_max_retries: int = Field(16, ge=0, description="Compare-and-set retries per user before ConflictError.")
    cas_backoff_ms: float = Field(
        2.0, ge=0, description="Base of the compare-and-set backoff (full jitter, doubling per retry)."
    )
    cas_backoff_cap_ms: float = Field(50.0, ge=0, description="Cap of the compare-and-set backoff.")
    cas_lock_ms: int = Field(
        250,
        ge=1,
        description="A writer that lost a compare-and-set race for a user takes the user's lock for this long, so its "
        "retry goes next instead of racing the other processes again (a hot user's writers cannot starve).",
    )
    user_ttl_s: int | None = Field(None, ge=1, description="Expire a user this long after its last write.")
    dedup_window: int = Field(
        128,
        ge=0,
        description="Recent event ids kept per user for de-duplication (0: off). Up to 128 the set stays in "
        "Redis's compact encoding; see docs/state_store.md for the bytes per user.",
    )

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> StoreSettings:
        """TLS files for a plain connection are a misconfiguration, not something to ignore."""
        tls = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(f is not None for f in tls) and not (self.redis_url or "").startswith("rediss"):
            raise ValueError("HYTREC_REDIS_TLS_* files are set but HYTREC_REDIS_URL is not a rediss:// URL")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("HYTREC_REDIS_TLS_CERT_FILE and HYTREC_REDIS_TLS_KEY_FILE go together")
        return self
