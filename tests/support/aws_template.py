"""The SAM template as CloudFormation would receive it (the real SAM transform, offline), with its
intrinsics resolved to the concrete names a moto-backed test creates.

    stack = Stack.of(TEMPLATE, "t1a2b3c4", {"GpuImageUri": "x/y:gpu"})
    stack.policies("WorkerFunction")   # [policy document, ...] of the function's execution role
    stack.env("WorkerFunction")        # its environment variables, Globals merged in by SAM
    stack.resolve(stack.resources["DataBucket"]["Properties"])

Physical names follow CloudFormation's rule closely enough for the tests: a name property
(BucketName, QueueName, Family, ...) wins; otherwise ``<stack>-<LogicalId>``. So a test creates

    AWS::S3::Bucket          its BucketName                 Arn  arn:aws:s3:::<name>
    AWS::SQS::Queue          its QueueName                  Arn  arn:aws:sqs:us-east-1:<acct>:<name>
    AWS::IAM::Role           <stack>-<LogicalId>            Arn  arn:aws:iam::<acct>:role/<name>
    AWS::ECS::TaskDefinition Ref: arn:aws:ecs:us-east-1:<acct>:task-definition/<Family or name>:1
    AWS::ECS::Cluster        <stack>-<LogicalId>

(moto's account is 123456789012 and its ARNs use us-east-1: queues must be made there.)
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"
PARTITION = "aws"
#: Parameters without defaults: placeholders (the template's subnets are never reached by moto).
DEFAULT_PARAMS = {
    "VpcId": "vpc-0123456789abcdef0",
    "SubnetA": "subnet-aaaa1111",
    "SubnetB": "subnet-bbbb2222",
    "SubnetIds": "subnet-aaaa1111,subnet-bbbb2222",
}

_NO_VALUE = object()
_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def translate(template_path: str | Path, params: dict[str, str]) -> dict[str, Any]:
    """The template after the SAM transform (offline: no AWS calls, no managed-policy lookups).
    Cached per file version and parameters; the stack name only enters at resolution."""
    path = str(template_path)
    given = {k: str(v) for k, v in params.items() if k != "StackName"}
    key = (path, os.stat(path).st_mtime_ns, tuple(sorted(given.items())))
    if key not in _CACHE:
        from cfnlint.decode import decode
        from samtranslator.translator.transform import transform

        tpl, matches = decode(path)
        if matches:
            raise ValueError(matches)
        doc = copy.deepcopy(tpl)
        for r in doc["Resources"].values():
            if r["Type"] == "AWS::Serverless::Function" and r["Properties"].get("PackageType") == "Image":
                r["Properties"].setdefault("ImageUri", f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/x:lambda")

        class NoManagedPolicies:  # every policy the tests evaluate is inline
            def load(self) -> dict[str, str]:
                return {}

        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)  # samtranslator wants a region
        known = {k: v for k, v in {**DEFAULT_PARAMS, **given}.items() if k in doc.get("Parameters", {})}
        _CACHE[key] = transform(doc, known, NoManagedPolicies())
    return copy.deepcopy(_CACHE[key])


class Resolver:
    """Evaluates Ref, Fn::GetAtt, Fn::Sub, Fn::If (with the template's Conditions), Fn::Join,
    Fn::Select, Fn::Split, Fn::Equals/Not/And/Or and drops AWS::NoValue."""

    def __init__(self, template: dict[str, Any], params: dict[str, str], physical: dict[Any, str] | None = None):
        self.t = template
        self.stack = params.get("StackName", "simtest")
        self.physical = physical or {}
        self.params: dict[str, Any] = {}
        for name, spec in template.get("Parameters", {}).items():
            value = params.get(name, DEFAULT_PARAMS.get(name, spec.get("Default")))
            if value is None:
                raise KeyError(f"parameter {name} has no value")
            if spec.get("Type", "").startswith("List<") or spec.get("Type") == "CommaDelimitedList":
                value = value.split(",") if isinstance(value, str) else list(value)
            self.params[name] = value
        self.pseudo: dict[str, Any] = {
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::Region": REGION,
            "AWS::Partition": PARTITION,
            "AWS::StackName": self.stack,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackId": f"arn:{PARTITION}:cloudformation:{REGION}:{ACCOUNT_ID}:stack/{self.stack}/0",
            "AWS::NoValue": _NO_VALUE,
        }
        self._conds: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self._conds:
            self._conds[name] = bool(self.resolve(self.t["Conditions"][name]))
        return self._conds[name]

    def exists(self, logical: str) -> bool:
        cond = self.t["Resources"][logical].get("Condition")
        return cond is None or self.condition(cond)

    def name(self, logical: str) -> str:
        if logical in self.physical:
            return self.physical[logical]
        props = self.t["Resources"][logical].get("Properties", {})
        for key in ("BucketName", "QueueName", "RoleName", "Family", "ClusterName", "FunctionName"):
            if key in props:
                return str(self.resolve(props[key]))
        return f"{self.stack}-{logical}"

    def ref(self, logical: str) -> Any:
        if logical in self.params:
            return self.params[logical]
        if logical in self.pseudo:
            return self.pseudo[logical]
        if (logical, "Ref") in self.physical:
            return self.physical[(logical, "Ref")]
        kind = self.t["Resources"][logical]["Type"]
        name = self.name(logical)
        if kind == "AWS::SQS::Queue":
            return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT_ID}/{name}"
        if kind == "AWS::ECS::TaskDefinition":
            return f"arn:{PARTITION}:ecs:{REGION}:{ACCOUNT_ID}:task-definition/{name}:1"
        return name

    def getatt(self, logical: str, attr: str) -> Any:
        if (logical, attr) in self.physical:
            return self.physical[(logical, attr)]
        kind = self.t["Resources"][logical]["Type"]
        name = self.name(logical)
        a, r, p = ACCOUNT_ID, REGION, PARTITION
        table = {
            ("AWS::S3::Bucket", "Arn"): f"arn:{p}:s3:::{name}",
            ("AWS::SQS::Queue", "Arn"): f"arn:{p}:sqs:{r}:{a}:{name}",
            ("AWS::SQS::Queue", "QueueName"): name,
            ("AWS::SQS::Queue", "QueueUrl"): f"https://sqs.{r}.amazonaws.com/{a}/{name}",
            ("AWS::IAM::Role", "Arn"): f"arn:{p}:iam::{a}:role/{name}",
            ("AWS::ECS::Cluster", "Arn"): f"arn:{p}:ecs:{r}:{a}:cluster/{name}",
            ("AWS::EFS::FileSystem", "Arn"): f"arn:{p}:elasticfilesystem:{r}:{a}:file-system/fs-{logical.lower()}",
            ("AWS::EFS::AccessPoint", "Arn"): f"arn:{p}:elasticfilesystem:{r}:{a}:access-point/fsap-{logical.lower()}",
            ("AWS::Logs::LogGroup", "Arn"): f"arn:{p}:logs:{r}:{a}:log-group:{name}:*",
            ("AWS::Lambda::Function", "Arn"): f"arn:{p}:lambda:{r}:{a}:function:{name}",
        }
        if (kind, attr) in table:
            return table[(kind, attr)]
        if attr == "Arn":
            return f"arn:{p}:{kind.split('::')[1].lower()}:{r}:{a}:{logical}"
        return f"{name}.{attr}"

    def _sub(self, text: str, extra: dict[str, Any]) -> str:
        def one(m: re.Match[str]) -> str:
            expr = m.group(1)
            if expr.startswith("!"):
                return "${" + expr[1:] + "}"
            if expr in extra:
                return str(extra[expr])
            if "." in expr and not expr.startswith("AWS::"):
                logical, attr = expr.split(".", 1)
                return str(self.getatt(logical, attr))
            return str(self.ref(expr))

        return re.sub(r"\$\{([^}]+)\}", one, text)

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [x for x in (self.resolve(x) for x in node) if x is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((k, v),) = node.items()
            if k == "Ref":
                return self.ref(v)
            if k == "Fn::GetAtt":
                logical, attr = v if isinstance(v, list) else v.split(".", 1)
                return self.getatt(logical, attr)
            if k == "Fn::Sub":
                if isinstance(v, str):
                    return self._sub(v, {})
                text, variables = v
                return self._sub(text, {n: self.resolve(x) for n, x in variables.items()})
            if k == "Fn::If":
                cond, yes, no = v
                return self.resolve(yes if self.condition(cond) else no)
            if k == "Fn::Join":
                sep, items = v
                return sep.join(str(x) for x in self.resolve(items))
            if k == "Fn::Select":
                i, items = v
                return self.resolve(items)[int(self.resolve(i))]
            if k == "Fn::Split":
                sep, s = v
                return self.resolve(s).split(sep)
            if k == "Fn::Equals":
                a, b = self.resolve(v)
                return str(a) == str(b)
            if k == "Fn::Not":
                return not self.resolve(v[0])
            if k == "Fn::And":
                return all(self.resolve(x) for x in v)
            if k == "Fn::Or":
                return any(self.resolve(x) for x in v)
            if k == "Condition":
                return self.condition(v)
        out = {k: self.resolve(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not _NO_VALUE}


class Stack:
    """One deployment of the template, as the tests build it on moto."""

    def __init__(
        self, translated: dict[str, Any], params: dict[str, str], physical: dict[Any, str] | None = None
    ) -> None:
        self.template = translated
        self.resources: dict[str, Any] = translated["Resources"]
        self.r = Resolver(translated, params, physical)
        self.name = self.r.stack

    @classmethod
    def of(
        cls,
        template_path: str | Path,
        stack_name: str,
        params: dict[str, str] | None = None,
        physical: dict[Any, str] | None = None,
    ) -> Stack:
        """``physical``: names of resources the test made itself (logical id -> Ref value)."""
        given = dict(params or {})
        return cls(translate(template_path, given), {**given, "StackName": stack_name}, physical)

    def resolve(self, node: Any) -> Any:
        return self.r.resolve(node)

    def of_type(self, kind: str) -> dict[str, Any]:
        return {k: v for k, v in self.resources.items() if v["Type"] == kind and self.r.exists(k)}

    def functions(self) -> list[str]:
        return sorted(self.of_type("AWS::Lambda::Function"))

    def function_role(self, function: str) -> str:
        role = self.resources[function]["Properties"]["Role"]
        return str(role["Fn::GetAtt"][0])

    def policies(self, principal: str) -> list[dict[str, Any]]:
        """Inline policy documents of a function's execution role (a function's logical id) or of
        a role (a role's logical id); every document gets a Version (moto insists, AWS does not)."""
        role = (
            self.function_role(principal) if self.resources[principal]["Type"] == "AWS::Lambda::Function" else principal
        )
        props = self.resolve(self.resources[role]["Properties"])
        docs = []
        for pol in props.get("Policies", []):
            doc = dict(pol["PolicyDocument"])
            doc.setdefault("Version", "2012-10-17")
            docs.append(doc)
        return docs

    def managed_policies(self, principal: str) -> list[str]:
        role = (
            self.function_role(principal) if self.resources[principal]["Type"] == "AWS::Lambda::Function" else principal
        )
        return list(self.resolve(self.resources[role]["Properties"]).get("ManagedPolicyArns", []))

    def env(self, function: str) -> dict[str, str]:
        props = self.resolve(self.resources[function]["Properties"])
        return {k: str(v) for k, v in props.get("Environment", {}).get("Variables", {}).items()}

    def container_env(self, task_definition: str) -> dict[str, str]:
        [c] = self.resolve(self.resources[task_definition]["Properties"])["ContainerDefinitions"]
        return {e["Name"]: str(e["Value"]) for e in c.get("Environment", [])}
