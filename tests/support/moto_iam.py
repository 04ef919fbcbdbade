"""moto's server with IAM enforced, as AWS applies it to what this project calls.

moto (5.2.x) authenticates every request (SigV4 really verified) and evaluates the caller's
identity policies once auth is on (``/moto-api/reset-auth``). Where it differs from AWS in a way the
pipeline depends on, ``install()`` patches moto in this process (ThreadedMotoServer runs here) so
the fixture encodes AWS's rule. Each rule, where moto differs and what AWS does:

  missing_key_needs_list  moto answers 404 NoSuchKey for a missing key whatever the caller may do;
                          AWS answers 403 AccessDenied (HEAD: bare 403) unless the caller has
                          s3:ListBucket on the bucket. (A manifest read before it exists.)
  action_aliases          moto checks SendMessageBatch / DeleteMessageBatch /
                          ChangeMessageVisibilityBatch as actions of their own; AWS checks
                          sqs:SendMessage / DeleteMessage / ChangeMessageVisibility (the *Batch
                          names are not IAM actions).
  s3_action_map           moto checks HeadBucket as s3:HeadBucket (not an IAM action; AWS:
                          s3:ListBucket) and HeadObject?versionId as s3:GetObject (AWS:
                          s3:GetObjectVersion).
  ecs_run_task_resource   moto authorises ECS against Resource "*", so a statement scoped to a
                          task-definition ARN never matches; AWS authorises RunTask against the
                          task definition's ARN.
  ecs_pass_role           moto never checks iam:PassRole; AWS does on RunTask, for the task
                          definition's task and execution roles (and an overridden taskRoleArn).
  json_access_denied      moto's denial for JSON-protocol services (SQS, ECS) is an XML body
                          botocore cannot parse (code "403"); AWS answers AccessDenied (SQS) /
                          AccessDeniedException (ECS).

Not modelled (tested as template invariants instead, tests/infrastructure/test_template.py):
Conditions are never evaluated by moto (a statement applies as if its Condition held, so
iam:PassedToService cannot be tested here), NotResource is ignored, EFS is not authorised at all.

State is process-wide: every ThreadedMotoServer in the process shares backends and the auth
switch, so enforcement is turned on per test (``enforce``) and off again after it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

ACCOUNT_ID = "123456789012"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
ACCESS_DENIED_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    "<Message>Access Denied</Message><RequestId>0</RequestId><HostId>0</HostId></Error>"
)
ACTION_ALIASES = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


# ------------------------------------------------------------------------------ switching and principals
def client(endpoint: str, service: str, creds: dict[str, str] | None = None) -> Any:
    import boto3
    from botocore.config import Config

    kw: dict[str, Any] = {}
    if creds:
        kw = {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds.get("SessionToken"),
        }
    cfg = Config(retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client(service, region_name="us-east-1", endpoint_url=endpoint, config=cfg, **kw)


def set_auth(endpoint: str, enforced: bool) -> None:
    """moto's switch: INITIAL_NO_AUTH_ACTION_COUNT := 0 (every request checked from now) or inf."""
    import requests

    r = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0" if enforced else b"inf", timeout=10)
    r.raise_for_status()


def bootstrap_admin(endpoint: str) -> dict[str, str]:
    """An IAM user allowed everything, made while auth is off; once it is on, the tests' dummy
    "testing" keys are refused (InvalidAccessKeyId) and the admin sets everything up."""
    iam = client(endpoint, "iam")
    name = f"admin-{os.urandom(4).hex()}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(ADMIN_POLICY))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    arn = iam.get_user(UserName=name)["User"]["Arn"]
    return {"AccessKeyId": k["AccessKeyId"], "SecretAccessKey": k["SecretAccessKey"], "Arn": arn}


def role_credentials(endpoint: str, admin: dict[str, str], name: str, docs: list[dict[str, Any]]) -> dict[str, str]:
    """A role with these inline policies, assumed by the admin: STS session credentials, checked
    on every request against the role's policies as they are then (no caching in moto)."""
    iam, sts = client(endpoint, "iam", admin), client(endpoint, "sts", admin)
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                # moto's trust check understands only an AWS principal (the Lambda service
                # principal alone makes AssumeRole fail with a 500), so the admin is listed too.
                "Principal": {"Service": "lambda.amazonaws.com", "AWS": admin["Arn"]},
            }
        ],
    }
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    put_policies(endpoint, admin, name, docs)
    c = sts.assume_role(RoleArn=arn, RoleSessionName=name[:64])["Credentials"]
    return {"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"], "SessionToken": c["SessionToken"]}


def put_policies(endpoint: str, admin: dict[str, str], role: str, docs: list[dict[str, Any]]) -> None:
    """Replace the role's inline policies (sessions already issued see the change at once)."""
    iam = client(endpoint, "iam", admin)
    for old in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        iam.delete_role_policy(RoleName=role, PolicyName=old)
    for i, doc in enumerate(docs):
        iam.put_role_policy(RoleName=role, PolicyName=f"p{i}", PolicyDocument=json.dumps(doc))


def without_action(docs: list[dict[str, Any]], statement: int, action: str) -> list[dict[str, Any]]:
    """The documents with one action removed from the ``statement``-th statement (counted over all
    documents), the statement dropped when it had no other action."""
    out = copy.deepcopy(docs)
    n = 0
    for d in out:
        kept = []
        for st in d["Statement"]:
            if n == statement:
                acts = [a for a in _actions(st) if a != action]
                if acts:
                    kept.append({**st, "Action": acts})
            else:
                kept.append(st)
            n += 1
        d["Statement"] = kept
    return [d for d in out if d["Statement"]]


def _actions(st: dict[str, Any]) -> list[str]:
    return list(st["Action"]) if isinstance(st["Action"], list) else [st["Action"]]


def allow_actions(docs: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    """(statement index, action, resource) of every Allow in the documents."""
    out = []
    n = 0
    for d in docs:
        for st in d["Statement"]:
            if st["Effect"] == "Allow":
                out += [(n, a, st.get("Resource")) for a in _actions(st)]
            n += 1
    return out


@contextlib.contextmanager
def credentials_env(creds: dict[str, str], endpoint: str) -> Iterator[None]:
    """The default credential chain (what similarity.aws.make_client uses) yields ``creds``.
    Clients read the environment when made: rebuild cached ones after entering and leaving."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"AWS_ACCESS_KEY_ID": creds["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"]})
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    if creds.get("SessionToken"):
        os.environ["AWS_SESSION_TOKEN"] = creds["SessionToken"]
    else:
        os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------ AWS's rules moto lacks
def auth_enforced() -> bool:
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    return bool(ActionAuthenticatorMixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT)


def caller_permitted(response: Any, action: str, resource: str) -> bool:
    """The signing principal's identity policies, evaluated for one action on one resource as
    moto evaluates them for the request itself."""
    from moto.iam.access_control import CreateAccessKeyFailure, IAMPolicy, PermissionResult, create_access_key

    auth = response.headers.get("Authorization", "")
    key_id = auth.partition("Credential=")[2].partition("/")[0]
    try:
        key = create_access_key(
            account_id=response.current_account, partition="aws", access_key_id=key_id, headers=response.headers
        )
    except CreateAccessKeyFailure:
        return False
    results = [IAMPolicy(p).is_action_permitted(action, resource) for p in key.collect_policies()]
    return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results


def install() -> Callable[[], None]:
    """Patch moto with every rule above; returns the undo."""
    from moto.core.exceptions import JsonRESTError
    from moto.ecs import responses as ecsr
    from moto.iam import access_control
    from moto.s3 import responses as s3r

    undo: list[Callable[[], None]] = []

    class JsonAccessDenied(JsonRESTError):
        code = 403

    # missing_key_needs_list
    orig_key_response = s3r.S3Response.key_response

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        status, hdrs, body = orig_key_response(self, request, full_url, headers)
        if status == 404 and request.method in ("GET", "HEAD") and auth_enforced():
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
            if request.method == "HEAD" or "NoSuchKey" in text:
                bucket = self.parse_bucket_name_from_url(request, full_url)
                if not caller_permitted(self, "s3:ListBucket", f"arn:aws:s3:::{bucket}"):
                    if request.method == "HEAD":
                        return 403, {}, ""
                    return 403, {"Content-Type": "application/xml"}, ACCESS_DENIED_XML
        return status, hdrs, body

    s3r.S3Response.key_response = key_response
    undo.append(lambda: setattr(s3r.S3Response, "key_response", orig_key_response))

    # action_aliases
    orig_init = access_control.IAMRequestBase.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        self._action = ACTION_ALIASES.get(self._action, self._action)

    access_control.IAMRequestBase.__init__ = init
    undo.append(lambda: setattr(access_control.IAMRequestBase, "__init__", orig_init))

    # s3_action_map
    amap = s3r.ACTION_MAP
    saved = (dict(amap["BUCKET"]["HEAD"]), dict(amap["KEY"]["HEAD"]))
    amap["BUCKET"]["HEAD"]["DEFAULT"] = "ListBucket"
    amap["KEY"]["HEAD"]["versionId"] = "GetObjectVersion"

    def restore_map() -> None:
        amap["BUCKET"]["HEAD"], amap["KEY"]["HEAD"] = saved

    undo.append(restore_map)

    # ecs_run_task_resource
    cls = ecsr.EC2ContainerServiceResponse
    had = "_determine_resource" in cls.__dict__

    def _determine_resource(self: Any) -> str:
        if self._get_action() == "RunTask":
            td = self._get_param("taskDefinition") or "*"
            if td.startswith("arn:"):
                return str(td)
            family, _, rev = td.partition(":")
            try:
                return str(self.ecs_backend.describe_task_definition(td).arn)
            except Exception:  # noqa: BLE001 - an unknown family: moto's own error follows
                return f"arn:aws:ecs:{self.region}:{self.current_account}:task-definition/{family}:{rev or '*'}"
        return "*"

    cls._determine_resource = _determine_resource
    undo.append(lambda: None if had else delattr(cls, "_determine_resource"))

    # ecs_pass_role
    orig_run_task = cls.run_task

    def run_task(self: Any) -> Any:
        if auth_enforced():
            td = self.ecs_backend.describe_task_definition(self._get_param("taskDefinition"))
            roles = {
                getattr(td, "task_role_arn", None),
                getattr(td, "execution_role_arn", None),
                (self._get_param("overrides") or {}).get("taskRoleArn"),
            } - {None, ""}
            for arn in sorted(roles):
                if not caller_permitted(self, "iam:PassRole", str(arn)):
                    raise JsonAccessDenied(
                        "AccessDeniedException", f"not authorized to perform: iam:PassRole on resource: {arn}"
                    )
        return orig_run_task(self)

    cls.run_task = run_task
    undo.append(lambda: setattr(cls, "run_task", orig_run_task))

    # json_access_denied
    orig_raise = access_control.IAMRequest._raise_access_denied

    def _raise_access_denied(self: Any) -> None:
        if self._headers.get("X-Amz-Target"):  # awsJson1_0 / 1_1
            code = "AccessDenied" if self._service == "sqs" else "AccessDeniedException"
            raise JsonAccessDenied(code, f"User: {self._access_key.arn} is not authorized to perform: {self._action}")
        orig_raise(self)

    access_control.IAMRequest._raise_access_denied = _raise_access_denied
    undo.append(lambda: setattr(access_control.IAMRequest, "_raise_access_denied", orig_raise))

    def uninstall() -> None:
        for u in reversed(undo):
            u()

    return uninstall
