"""A recurring scoring job on the deployed service (Airflow 3).

Every day: submit the day's CSV, already in the deployment's bucket, to ``POST /jobs``; wait for
``GET /jobs/{id}`` to say ``done`` with a sensor in reschedule mode (the worker slot is free
between checks); fail the run, without retries, with the job's reason when the job fails.

Set up:
- copy this file and ``similarity_jobs.py`` into the DAG folder;
- an HTTP connection ``similarity_api``: host = the API's URL (stack output ``ApiUrl``), extra
  ``{"auth": "sigv4", "region": "us-east-1"}`` (the workers' AWS credentials must allow
  ``execute-api:Invoke``; botocore comes with apache-airflow-providers-amazon), or
  ``{"auth": "bearer"}`` with the token as the password;
- the params: ``input`` (``{ds}`` is the run's date), optional ``output`` and ``excel_safe``.
  Do not point ``input`` under the bucket's ``incoming/`` prefix: a drop there starts a job by
  itself.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import BaseHook, Param, PokeReturnValue, dag, task
from airflow.sdk.exceptions import AirflowFailException

# Airflow's processes put the DAG folder on sys.path; a bare DagBag or dag.test() may not.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from similarity_jobs import JobFailed, JobsApi

CONN_ID = "similarity_api"
#: Seconds between status checks (a job of 100k rows takes minutes).
POKE_SECONDS = float(os.environ.get("SIMILARITY_DAG_POKE_SECONDS", "60"))


def _api() -> JobsApi:
    conn = BaseHook.get_connection(CONN_ID)
    host = conn.host or ""
    if "://" not in host:
        host = f"{conn.schema or 'https'}://{host}" + (f":{conn.port}" if conn.port else "")
    return JobsApi.from_connection(host, conn.extra_dejson, conn.password)


@dag(
    dag_id="similarity_score_csv",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    params={
        "input": Param(
            "s3://BUCKET/exports/{ds}.csv", type="string", description="s3:// URI in the deployment's bucket"
        ),
        "output": Param(
            None, type=["null", "string"], description="default: scored/_/<key's folders>/<name>_scored.csv"
        ),
        "excel_safe": Param(False, type="boolean"),
    },
    tags=["similarity"],
)
def similarity_score_csv() -> None:
    @task
    def submit(params: dict[str, Any] | None = None, ds: str | None = None) -> str:
        p = params or {}
        job = _api().start(str(p["input"]).format(ds=ds), p.get("output"), bool(p.get("excel_safe")))
        # Deployed, POST /jobs answers `splitting` and bad input fails the job while `wait` polls;
        # an API that splits inline (`similarity serve`) may already reject it here.
        if job.get("state") == "failed":  # no URL column, empty file, ...
            raise AirflowFailException(f"job {job.get('job_id')} failed: {job.get('reason')}")
        return str(job["job_id"])

    @task.sensor(poke_interval=POKE_SECONDS, timeout=12 * 3600, mode="reschedule")
    def wait(job_id: str) -> PokeReturnValue:
        try:
            status = _api().check(job_id)
        except JobFailed as exc:
            raise AirflowFailException(str(exc)) from None  # the job's reason; retrying will not help
        return PokeReturnValue(is_done=status is not None, xcom_value=status)

    @task
    def report(status: dict[str, Any]) -> dict[str, Any]:
        rows = status.get("rows", {})
        print(f"job {status['job_id']}: {rows.get('total')} rows -> {status['output']}; errors {status.get('errors')}")
        return {"output": status["output"], "rows": rows.get("total"), "errors": status.get("errors", {})}

    report(wait(submit()))


similarity_score_csv()
