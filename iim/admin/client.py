"""A small synchronous JSON client for the admin API, used by the CLI.

Synchronous on purpose: a CLI command makes one or two requests, and staying off asyncio means
``iim.admin.cli`` can be called from anywhere (including a test's worker thread). Problem documents
come back as :class:`ApiProblem` so the CLI can print ``error_id`` and field locations.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from iim.admin.problems import Problem, problem_from_json


class ClientError(Exception):
    """The API could not be reached or answered something that is not our JSON."""


class ApiProblem(Exception):
    """The API answered with an error status (normally with a problem+json body)."""

    def __init__(self, status: int, problem: Problem | None, text: str) -> None:
        self.status = status
        self.problem = problem
        self.text = text
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.problem is None:
            return f"HTTP {self.status}: {self.text[:500]}"
        p = self.problem
        return f"{p.status} {p.error_id}: {p.title}: {p.detail}"


class ApiClient:
    """``traceparent``: sent on every request (W3C Trace Context), so the API's spans join the caller's trace."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 10.0,
                 traceparent: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--api must be an http:// or https:// URL (got {base_url!r})")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._traceparent = traceparent

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | int] | None = None,
    ) -> Any:
        """Send one request; the decoded JSON response (``None`` for 204), else raise."""
        target = self._base_path + path
        if query:
            target += "?" + urlencode(query)
        headers = {"Accept": "application/json, application/problem+json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._traceparent is not None:
            headers["traceparent"] = self._traceparent
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, target, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the admin API at {self._scheme}://{self._host}: {exc}") from exc
        finally:
            conn.close()
        text = raw.decode("utf-8", errors="replace")
        if status == 204:
            return None
        try:
            decoded = json.loads(text) if text else None
        except json.JSONDecodeError:
            decoded = None
        if status >= 400:
            raise ApiProblem(status, problem_from_json(decoded), text)
        if decoded is None:
            raise ClientError(f"HTTP {status}: the response is not JSON")
        return decoded
