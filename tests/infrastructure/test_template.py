"""The SAM template: cfn-lint clean, and the invariants the deployment relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


@pytest.fixture(scope="module")
def tpl() -> dict:
    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return template


def resources(tpl: dict, kind: str) -> dict:
    return {k: v for k, v in tpl["Resources"].items() if v["Type"] == kind}


def test_cfn_lint_clean() -> None:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    r = subprocess.run([str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_functions_are_container_images_with_model_on_efs(tpl) -> None:
    fns = resources(tpl, "AWS::Serverless::Function")
    assert set(fns) >= {"ApiFunction", "S3EventFunction", "WorkerFunction", "ModelSyncFunction"}
    for name, fn in fns.items():
        props = fn["Properties"]
        assert props["PackageType"] == "Image", name
        assert fn["Metadata"]["Dockerfile"] == "Dockerfile"
    for name in ("ApiFunction", "WorkerFunction", "ModelSyncFunction"):
        props = fns[name]["Properties"]
        [fs] = props["FileSystemConfigs"]
        assert fs["Arn"] == {"Fn::GetAtt": ["ModelAccessPoint", "Arn"]}  # via the access point
        assert fs["LocalMountPath"].startswith("/mnt/")
        assert set(fns[name]["DependsOn"]) >= {"MountTargetA", "MountTargetB"}
    assert fns["ApiFunction"]["Properties"]["MemorySize"] >= 3538  # 2+ vCPUs


def test_efs_encrypted_with_two_mount_targets_and_access_point(tpl) -> None:
    [fs] = resources(tpl, "AWS::EFS::FileSystem").values()
    assert fs["Properties"]["Encrypted"] is True
    assert fs["Properties"]["ThroughputMode"] in ("elastic", "provisioned")
    mts = resources(tpl, "AWS::EFS::MountTarget")
    assert len(mts) >= 2
    subnets = {str(m["Properties"]["SubnetId"]) for m in mts.values()}
    assert len(subnets) == len(mts)  # different subnets
    [ap] = resources(tpl, "AWS::EFS::AccessPoint").values()
    assert ap["Properties"]["PosixUser"]["Uid"] and ap["Properties"]["RootDirectory"]["Path"] != "/"


def test_nfs_only_from_the_function_security_group(tpl) -> None:
    for name, sg in resources(tpl, "AWS::EC2::SecurityGroup").items():
        for rule in sg["Properties"].get("SecurityGroupIngress", []):
            ports = range(int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535)) + 1)
            if 2049 in ports or rule.get("IpProtocol") == "-1":
                assert "CidrIp" not in rule and "CidrIpv6" not in rule, f"{name} opens NFS to an address range"
                assert rule["SourceSecurityGroupId"] == {"Ref": "FunctionSecurityGroup"}


def test_every_route_has_iam_auth_and_throttling(tpl) -> None:
    [api] = resources(tpl, "AWS::Serverless::HttpApi").values()
    auth = api["Properties"]["Auth"]
    assert auth["DefaultAuthorizer"] == "AWS_IAM" and auth["EnableIamAuthorizer"] is True
    routes = []
    for fn in resources(tpl, "AWS::Serverless::Function").values():
        for ev in fn["Properties"].get("Events", {}).values():
            if ev["Type"] == "HttpApi":
                props = ev["Properties"]
                assert props.get("Auth", {}).get("Authorizer", "AWS_IAM") != "NONE"
                routes.append((props["Method"], props["Path"]))
    assert {
        ("POST", "/score"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("POST", "/jobs"),
        ("GET", "/jobs/{id}"),
    } <= set(routes)
    rs = api["Properties"]["DefaultRouteSettings"]
    assert rs["ThrottlingRateLimit"] and rs["ThrottlingBurstLimit"]


def test_logs_have_retention_and_outputs_exist(tpl) -> None:
    for name, lg in resources(tpl, "AWS::Logs::LogGroup").items():
        assert "RetentionInDays" in lg["Properties"], name
    assert {"ApiUrl", "ModelFileSystemId", "DataBucketName", "ChunkQueueUrl"} <= set(tpl["Outputs"])


def test_queue_dlq_and_visibility(tpl) -> None:
    q = tpl["Resources"]["ChunkQueue"]["Properties"]
    worker = tpl["Resources"]["WorkerFunction"]["Properties"]
    assert q["VisibilityTimeout"] >= 6 * worker["Timeout"]
    assert q["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["ChunkDeadLetterQueue", "Arn"]}
    assert 1 < q["RedrivePolicy"]["maxReceiveCount"] <= 5
    [ev] = [e for e in worker["Events"].values() if e["Type"] == "SQS"]
    assert ev["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert "MaximumConcurrency" in ev["Properties"]["ScalingConfig"]


def test_s3_trigger_cannot_loop(tpl) -> None:
    fn = tpl["Resources"]["S3EventFunction"]["Properties"]
    [ev] = [e for e in fn["Events"].values() if e["Type"] == "S3"]
    rules = {r["Name"]: r["Value"] for r in ev["Properties"]["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "incoming/", "suffix": ".csv"}
    env = tpl["Globals"]["Function"]["Environment"]["Variables"]
    for key in ("OUTPUT_PREFIX", "JOBS_PREFIX"):
        assert not env[key].startswith(rules["prefix"]) and not rules["prefix"].startswith(env[key])
    dest = fn["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]
    assert dest["Type"] == "SQS"


def test_least_privilege_no_wildcard_actions(tpl) -> None:
    def statements(policies):
        for p in policies:
            if isinstance(p, dict) and "Statement" in p:
                yield from p["Statement"]
            elif isinstance(p, dict) and "Fn::If" in p:
                yield from statements([x for x in p["Fn::If"][1:] if isinstance(x, dict)])

    for name, fn in resources(tpl, "AWS::Serverless::Function").items():
        for st in statements(fn["Properties"].get("Policies", [])):
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, actions)
            assert st["Resource"] != "*", name


def test_gpu_path(tpl) -> None:
    r = tpl["Resources"]
    cp = r["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert cp["ManagedScaling"]["Status"] == "ENABLED"
    asg = r["GpuAutoScalingGroup"]["Properties"]
    assert asg["MinSize"] == "0"  # scales to zero
    lt = r["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert lt["ImageId"] == {"Ref": "GpuAmiId"}
    assert "gpu" in tpl["Parameters"]["GpuAmiId"]["Default"]
    td = r["GpuTaskDefinition"]["Properties"]
    [c] = td["ContainerDefinitions"]
    assert {"Type": "GPU", "Value": "1"} in c["ResourceRequirements"]
    [vol] = td["Volumes"]
    assert vol["EFSVolumeConfiguration"]["AuthorizationConfig"]["AccessPointId"] == {"Ref": "ModelAccessPoint"}
    assert c["LogConfiguration"]["LogDriver"] == "awslogs"


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python" in text
    for target in ("AS lambda", "AS tools", "AS gpu"):
        assert target in text
    assert "COPY models" not in text and "/mnt/models" in text  # model never baked in


@pytest.fixture(scope="module")
def translated(tpl) -> dict:
    """The template after the real SAM transform (offline), as `sam deploy` would submit it.
    `sam build` fills in each function's ImageUri; we do the same with a placeholder."""
    import copy

    from samtranslator.translator.transform import transform

    doc = copy.deepcopy(tpl)
    for r in doc["Resources"].values():
        if r["Type"] == "AWS::Serverless::Function":
            r["Properties"]["ImageUri"] = "123456789012.dkr.ecr.us-east-1.amazonaws.com/similarity:lambda"

    class NoManagedPolicies:  # every policy here is inline or a SAM policy template
        def load(self) -> dict:
            return {}

    params = {
        "VpcId": "vpc-0123456789abcdef0",
        "SubnetIds": "subnet-aaaa1111,subnet-bbbb2222",
        "GpuImageUri": "x/y:gpu",
    }
    return transform(doc, params, NoManagedPolicies())


def test_sam_transform_iam_on_every_route(translated) -> None:
    [api] = [v for v in translated["Resources"].values() if v["Type"] == "AWS::ApiGatewayV2::Api"]
    paths = api["Properties"]["Body"]["paths"]
    ops = [(p, m, op) for p, methods in paths.items() for m, op in methods.items()]
    assert len(ops) == 5
    for path, method, op in ops:
        assert op.get("security") == [{"AWS_IAM": []}], (path, method)


def test_sam_transform_wiring(translated, tmp_path) -> None:
    res = translated["Resources"]
    bucket = res["DataBucket"]["Properties"]["NotificationConfiguration"]["LambdaConfigurations"][0]
    rules = {r["Name"]: r["Value"] for r in bucket["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "incoming/", "suffix": ".csv"}
    [esm] = [v for v in res.values() if v["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert esm["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    fns = [v for v in res.values() if v["Type"] == "AWS::Lambda::Function"]
    assert len(fns) == 4 and all(f["Properties"]["PackageType"] == "Image" for f in fns)
    # and the submitted template lints clean too
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "translated.json"
    out.write_text(json.dumps(translated))
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    r = subprocess.run([str(cfn_lint), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_broad_writers_cannot_write_the_trigger_prefix(tpl) -> None:
    """Whoever may write anywhere in the bucket is denied incoming/, so no output can start a job."""

    def sub(res) -> str:
        return res.get("Fn::Sub", "") if isinstance(res, dict) else str(res)

    checked = 0
    for name, fn in resources(tpl, "AWS::Serverless::Function").items():
        sts = [st for p in fn["Properties"].get("Policies", []) if isinstance(p, dict) for st in p.get("Statement", [])]
        broad = [
            st
            for st in sts
            if st["Effect"] == "Allow" and "s3:PutObject" in st["Action"] and sub(st["Resource"]).endswith("-data/*")
        ]
        if broad:
            checked += 1
            assert any(
                st["Effect"] == "Deny"
                and "s3:PutObject" in st["Action"]
                and sub(st["Resource"]).endswith("/incoming/*")
                for st in sts
            ), name
    assert checked >= 2


def test_functions_that_read_job_files_may_list_the_bucket(tpl) -> None:
    """Without s3:ListBucket, S3 answers 403 AccessDenied instead of 404 for a missing key, so a
    function that reads a manifest or marker that may not exist yet would fail on every call."""

    def sub(res) -> str:
        return res.get("Fn::Sub", "") if isinstance(res, dict) else str(res)

    for name in ("S3EventFunction", "WorkerFunction", "ApiFunction"):
        sts = [
            st
            for p in tpl["Resources"][name]["Properties"]["Policies"]
            if isinstance(p, dict)
            for st in p.get("Statement", [])
        ]
        reads_jobs = any(
            st["Effect"] == "Allow"
            and "s3:GetObject" in st["Action"]
            and (sub(st["Resource"]).endswith("/jobs/*") or sub(st["Resource"]).endswith("-data/*"))
            for st in sts
        )
        lists = any(
            st["Effect"] == "Allow" and "s3:ListBucket" in st["Action"] and sub(st["Resource"]).endswith("-data")
            for st in sts
        )
        assert reads_jobs and lists, name
