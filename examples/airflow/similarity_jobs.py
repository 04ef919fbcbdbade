"""A small client for the deployment's batch-job routes, without Airflow: ``POST /jobs`` and
``GET /jobs/{id}`` (README, "HTTPS API and batch jobs"). The DAG beside it uses it; it is kept
apart so it can be tested without Airflow.

Auth: ``sigv4`` signs each request for API Gateway's IAM authoriser with the worker's AWS
credentials (botocore, which Airflow's Amazon provider brings); ``bearer`` sends a token (the
JWT option in docs/deploy.md); ``none`` sends nothing (a server on a private network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import requests

#: Terminal job states (similarity.jobs.JobState).
DONE, FAILED = "done", "failed"


class JobFailed(Exception):
    """The job ended in ``failed``; the message carries its reason."""


class ApiError(Exception):
    """The API refused a request (4xx/5xx); the message carries its error body."""


@dataclass
class JobsApi:
    base_url: str
    auth: str = "sigv4"  # sigv4 | bearer | none
    region: str | None = None
    token: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_connection(
        cls, uri_or_host: str, extra: dict[str, Any] | None = None, password: str | None = None
    ) -> JobsApi:
        extra = extra or {}
        return cls(
            base_url=uri_or_host.rstrip("/"),
            auth=str(extra.get("auth", "sigv4")),
            region=extra.get("region"),
            token=password or extra.get("token"),
            timeout=float(extra.get("timeout", 30)),
        )

    def _headers(self, method: str, url: str, body: bytes) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.auth == "bearer":
            if not self.token:
                raise ApiError("auth 'bearer' needs a token (the connection's password)")
            headers["authorization"] = f"Bearer {self.token}"
        elif self.auth == "sigv4":
            import botocore.session
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest

            session = botocore.session.Session()
            credentials = session.get_credentials()
            if credentials is None:
                raise ApiError("auth 'sigv4' needs AWS credentials on the worker")
            region = self.region or session.get_config_variable("region") or "us-east-1"
            request = AWSRequest(method=method, url=url, data=body, headers=headers)
            SigV4Auth(credentials.get_frozen_credentials(), "execute-api", region).add_auth(request)
            headers = dict(request.headers.items())
        elif self.auth != "none":
            raise ApiError(f"unknown auth {self.auth!r}: sigv4, bearer or none")
        return headers

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        body = json.dumps(payload).encode() if payload is not None else b""
        r = requests.request(
            method, url, data=body or None, headers=self._headers(method, url, body), timeout=self.timeout
        )
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"code": "not_json", "message": r.text[:500]}}
        if r.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(f"{method} {path}: HTTP {r.status_code} {err.get('code')}: {err.get('message')}")
        return data

    def start(self, input_uri: str, output_uri: str | None = None, excel_safe: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": input_uri, "excel_safe": excel_safe}
        if output_uri:
            payload["output"] = output_uri
        return self._call("POST", "/jobs", payload)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def check(self, job_id: str) -> dict[str, Any] | None:
        """The status when the job is done, None while it runs; ``JobFailed`` when it failed."""
        st = self.status(job_id)
        if st.get("state") == FAILED:
            raise JobFailed(f"job {job_id} failed: {st.get('reason') or 'no reason given'}")
        return st if st.get("state") == DONE else None
