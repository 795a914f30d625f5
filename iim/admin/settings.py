"""Settings of the admin API from ``IIM_ADMIN_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IIM_ADMIN_", extra="ignore")

    tokens_ref: str | None = Field(
        default=None,
        description="env:VAR or file:/path holding the token table JSON; unset -> every request is 401",
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_page_size: int = Field(default=1000, ge=1, le=10_000)
    prefix: str = Field(default="/v1", pattern=r"^/[a-z0-9]+$", description="where the API is mounted")
    store_deadline_s: float = Field(default=5.0, gt=0,
                                    description="the longest a request waits for PostgreSQL before its 503")
