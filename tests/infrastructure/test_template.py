"""The SAM template: cfn-lint clean before and after the SAM transform, and the invariants the
deployment relies on, checked on the template as written and on the translated template with its
intrinsics resolved (tests/support/aws_template.py). What moto cannot enforce in test_iam.py
(Conditions, the EFS file-system policy, the network) is checked here."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from support.aws_template import Stack

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
GPU = {"GpuImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/similarity-gpu:latest"}


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
        assert fns[name]["DependsOn"] == ["MountTargetsReady"]  # every mount target, the third when set
    assert fns["ApiFunction"]["Properties"]["MemorySize"] >= 3538  # 2+ vCPUs


def test_efs_encrypted_with_a_mount_target_per_subnet_and_access_point(tpl) -> None:
    [fs] = resources(tpl, "AWS::EFS::FileSystem").values()
    assert fs["Properties"]["Encrypted"] is True
    assert fs["Properties"]["ThroughputMode"] in ("elastic", "provisioned")
    mts = resources(tpl, "AWS::EFS::MountTarget")
    assert {m["Properties"]["SubnetId"]["Ref"] for m in mts.values()} == {"SubnetA", "SubnetB", "SubnetC"}
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
    assert ev["Properties"]["BatchSize"] == 1
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
    env = {e["Name"]: e["Value"] for e in c["Environment"]}
    # worker processes are a deploy parameter, off by default, validated like the variable
    assert env["SIMILARITY_PROCESSES"] == {"Ref": "GpuProcesses"}
    param = tpl["Parameters"]["GpuProcesses"]
    from similarity.config import ScoreSettings

    field = ScoreSettings.model_fields["processes"]
    assert param["Default"] == field.default == 0
    assert (param["MinValue"], param["MaxValue"]) == (0, 256)
    assert [m.ge for m in field.metadata if hasattr(m, "ge")] == [0]
    assert [m.le for m in field.metadata if hasattr(m, "le")] == [256]
    # so is the pixel path: the same closed set as the setting
    from similarity.config import ModelSettings
    from similarity.model import PIXEL_PATHS

    assert env["SIMILARITY_PIXELS"] == {"Ref": "GpuPixels"}
    pixels = tpl["Parameters"]["GpuPixels"]
    assert pixels["Default"] == ModelSettings.model_fields["pixels"].default == "pillow"
    assert tuple(pixels["AllowedValues"]) == PIXEL_PATHS
    # and the two cannot be combined at deploy time, as the scorer refuses them at run time
    [rule] = tpl["Rules"]["GpuPixelsWithoutProcesses"]["Assertions"]

    def holds(expr, params):  # the three intrinsics the rule uses, as CloudFormation evaluates them
        if isinstance(expr, dict) and "Fn::Or" in expr:
            return any(holds(e, params) for e in expr["Fn::Or"])
        if isinstance(expr, dict) and "Fn::Equals" in expr:
            a, b = (params[e["Ref"]] if isinstance(e, dict) else str(e) for e in expr["Fn::Equals"])
            return a == b
        raise AssertionError(expr)

    for px, procs, ok in (("pillow", "0", True), ("pillow", "4", True), ("torch", "0", True), ("nvjpeg", "2", False)):
        assert holds(rule["Assert"], {"GpuPixels": px, "GpuProcesses": procs}) is ok, (px, procs)


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python" in text
    for target in ("AS lambda", "AS tools", "AS gpu"):
        assert target in text
    assert "COPY models" not in text and "/mnt/models" in text  # model never baked in
    gpu_stage = text.split("AS gpu", 1)[1].split("\nFROM ", 1)[0]
    assert "[torch,cache,gpu,lambda]" in gpu_stage  # nvjpeg's nvImageCodec; powertools (test_image_imports)


def test_lambda_image_settings() -> None:
    """The Lambda stage's ENV, as the bench's API cold start reads it (support.lambda_env): a sandbox
    starts with an empty /tmp, so OpenVINO caches no blobs; the model is the EFS mount, never the hub."""
    from support.lambda_env import dockerfile_env

    env = dockerfile_env("lambda")
    assert env["SIMILARITY_OV_CACHE_DIR"] == "off" and env["SIMILARITY_BACKEND"] == "auto"
    assert env["CLIP_MODEL_DIR"].startswith("/mnt/models/") and env["HF_HUB_OFFLINE"] == "1"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "33554432" and env["OMP_NUM_THREADS"] == "2"
    assert dockerfile_env("tools") == {"HF_HUB_OFFLINE": "0"}  # a stage's own lines only


@pytest.fixture(scope="module")
def translated() -> dict:
    """The template after the real SAM transform (offline), as `sam deploy` would submit it, with
    a GPU image (support.aws_template fills in each function's ImageUri as `sam build` does)."""
    from support.aws_template import translate

    return translate(TEMPLATE, {"GpuImageUri": "x/y:gpu"})


def test_sam_transform_keeps_the_rules(translated) -> None:
    assert "GpuPixelsWithoutProcesses" in translated["Rules"]


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
    assert len(fns) == 5 and all(f["Properties"]["PackageType"] == "Image" for f in fns)
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

    for name in ("S3EventFunction", "WorkerFunction", "ApiFunction", "GpuTaskStoppedFunction"):
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


# ------------------------------------------------------------------------------ the translated template, resolved
def stack(**params: str) -> Stack:
    return Stack.of(TEMPLATE, "simtest", {**GPU, **params})


def statements(s: Stack, principal: str) -> list[dict[str, Any]]:
    return [st for doc in s.policies(principal) for st in doc["Statement"]]


def listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def allows(s: Stack, principal: str, action: str, resource: str) -> bool:
    """Identity policies only, as IAM evaluates them: an Allow matches and no Deny does."""

    def match(st: dict[str, Any]) -> bool:
        return any(fnmatch.fnmatchcase(action, a) for a in listed(st["Action"])) and any(
            fnmatch.fnmatchcase(resource, r) for r in listed(st["Resource"])
        )

    sts = statements(s, principal)
    return any(st["Effect"] == "Allow" and match(st) for st in sts) and not any(
        st["Effect"] == "Deny" and match(st) for st in sts
    )


PRINCIPALS = [
    "ApiFunction",
    "S3EventFunction",
    "WorkerFunction",
    "ModelSyncFunction",
    "GpuTaskStoppedFunction",
    "GpuTaskRole",
]


@pytest.mark.parametrize("extra", [{}, {"SubnetC": "subnet-cccc3333"}], ids=["two-subnets", "three-subnets"])
def test_mount_targets_are_exactly_the_subnets_everything_runs_in(extra: dict[str, str]) -> None:
    """Lambda refuses a function in a subnet whose AZ has no mount target: the mount targets, the
    EFS functions' subnets, the GPU tasks' subnets and the GPU instances' subnets are one list,
    of the two or three subnet parameters."""
    s = stack(**extra)
    subnets = [s.resolve({"Ref": p}) for p in ("SubnetA", "SubnetB", "SubnetC") if s.resolve({"Ref": p})]
    assert len(subnets) == 2 + bool(extra)
    targets = [s.resolve(m["Properties"]["SubnetId"]) for m in s.of_type("AWS::EFS::MountTarget").values()]
    assert sorted(targets) == sorted(subnets)
    ready = s.resolve(s.resources["MountTargetsReady"]["Metadata"]["MountTargets"])
    assert sorted(ready) == sorted(s.r.name(m) for m in s.of_type("AWS::EFS::MountTarget"))
    efs_functions = [f for f in s.functions() if s.resources[f]["Properties"].get("FileSystemConfigs")]
    assert set(efs_functions) == {"ApiFunction", "WorkerFunction", "ModelSyncFunction"}
    for f in efs_functions:
        assert sorted(s.resolve(s.resources[f]["Properties"]["VpcConfig"]["SubnetIds"])) == sorted(subnets), f
        assert "MountTargetsReady" in s.resources[f]["DependsOn"], f
    # where RunTask sends the GPU task (only the splitter starts it: POST /jobs hands it the split)
    assert sorted(s.env("S3EventFunction")["ECS_SUBNETS"].split(",")) == sorted(subnets)
    asg = s.resolve(s.resources["GpuAutoScalingGroup"]["Properties"]["VPCZoneIdentifier"])
    assert sorted(asg) == sorted(subnets)


def test_only_functions_that_mount_efs_run_in_the_vpc() -> None:
    s = stack()
    for f in s.functions():
        props = s.resources[f]["Properties"]
        assert bool(props.get("VpcConfig")) == bool(props.get("FileSystemConfigs")), f
    assert "VpcConfig" not in s.resources["S3EventFunction"]["Properties"]


def test_efs_policy_allows_tls_only_and_writes_only_from_model_sync() -> None:
    s = stack()
    policy = s.resolve(s.resources["ModelFileSystem"]["Properties"]["FileSystemPolicy"])
    sts = policy["Statement"]
    [tls] = [st for st in sts if st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    assert tls["Effect"] == "Deny" and tls["Action"] == "*" and tls["Principal"] == {"AWS": "*"}
    sync_role = s.resolve({"Fn::GetAtt": ["ModelSyncFunctionRole", "Arn"]})
    [no_write] = [
        st for st in sts if st["Effect"] == "Deny" and "elasticfilesystem:ClientWrite" in listed(st["Action"])
    ]
    assert no_write["Principal"] == {"AWS": "*"}
    assert no_write["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": sync_role}}
    writers = [
        p
        for st in sts
        if st["Effect"] == "Allow" and "elasticfilesystem:ClientWrite" in listed(st["Action"])
        for p in listed(st["Principal"]["AWS"])
    ]
    assert writers == [sync_role]
    [root] = [st for st in sts if "elasticfilesystem:ClientRootAccess" in listed(st["Action"])]
    assert root["Effect"] == "Deny" and "Condition" not in root
    readers = {
        p
        for st in sts
        if st["Effect"] == "Allow" and listed(st["Action"]) == ["elasticfilesystem:ClientMount"]
        for p in listed(st["Principal"]["AWS"])
    }
    roles = {r: s.resolve({"Fn::GetAtt": [r, "Arn"]}) for r in ("ApiFunctionRole", "WorkerFunctionRole", "GpuTaskRole")}
    assert readers == set(roles.values())
    assert all(
        st.get("Condition", {}).get("Bool", {}).get("elasticfilesystem:AccessedViaMountTarget") == "true"
        for st in sts
        if st["Effect"] == "Allow"
    )
    # and no identity policy but model sync's may write (the two policies agree)
    fs_arn = "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-0123"
    for p in PRINCIPALS:
        assert allows(s, p, "elasticfilesystem:ClientWrite", fs_arn) == (p == "ModelSyncFunction"), p


def test_principals_that_read_keys_that_may_be_missing_may_list_the_bucket() -> None:
    """Without s3:ListBucket S3 answers 403 for a missing key: whoever reads a manifest, marker,
    lock or input that may not exist must have it. (The GPU task reads only keys that exist: its
    manifest and the source version the splitter saw.)"""
    s = stack()
    bucket = s.r.name("DataBucket")
    for p in ("S3EventFunction", "WorkerFunction", "ApiFunction", "GpuTaskStoppedFunction"):
        assert allows(s, p, "s3:GetObject", f"arn:aws:s3:::{bucket}/jobs/x/manifest.json"), p
        assert allows(s, p, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), p
    assert allows(s, "S3EventFunction", "s3:GetObjectVersion", f"arn:aws:s3:::{bucket}/incoming/x.csv")
    assert allows(s, "S3EventFunction", "s3:GetObjectVersion", f"arn:aws:s3:::{bucket}/uploads/x.csv")  # POST /jobs
    assert allows(s, "GpuTaskRole", "s3:GetObjectVersion", f"arn:aws:s3:::{bucket}/incoming/x.csv")


def test_no_trigger_loop() -> None:
    """Only incoming/*.csv starts a job; nobody who writes outputs or job files may write there,
    the output and job prefixes lie outside it, and the task-stopped handler starts no task."""
    s = stack()
    bucket = s.r.name("DataBucket")
    [cfg] = s.resolve(s.resources["DataBucket"]["Properties"]["NotificationConfiguration"]["LambdaConfigurations"])
    rules = {r["Name"]: r["Value"] for r in cfg["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "incoming/", "suffix": ".csv"} and cfg["Event"] == "s3:ObjectCreated:*"
    for p in PRINCIPALS:
        assert not allows(s, p, "s3:PutObject", f"arn:aws:s3:::{bucket}/incoming/loop.csv"), p
        assert not allows(s, p, "s3:PutObject", f"arn:aws:s3:::{bucket}/incoming/a/b.csv"), p
    for f in ("S3EventFunction", "WorkerFunction", "ApiFunction"):
        env = s.env(f)
        for key in ("OUTPUT_PREFIX", "JOBS_PREFIX"):
            assert not env[key].startswith(rules["prefix"]) and not rules["prefix"].startswith(env[key])
    assert not allows(
        s, "GpuTaskStoppedFunction", "ecs:RunTask", "arn:aws:ecs:us-east-1:123456789012:task-definition/simtest-gpu:1"
    )


def test_every_queue_has_a_dead_letter_queue_or_is_one() -> None:
    """A queue a function consumes sends what fails repeatedly to a DLQ, and its visibility
    timeout is at least six times the consumer's timeout (Lambda's guidance for SQS); every other
    queue is where failures land (a redrive target, an on-failure destination, a rule's DLQ), and
    keeps them longer than the source would."""
    s = stack()
    queues = s.of_type("AWS::SQS::Queue")
    arn = {q: s.resolve({"Fn::GetAtt": [q, "Arn"]}) for q in queues}
    consumers = {}
    for m in s.of_type("AWS::Lambda::EventSourceMapping").values():
        props = s.resolve(m["Properties"])
        consumers[props["EventSourceArn"]] = props["FunctionName"]
    failure_targets = set()
    for q in queues:
        rp = s.resolve(s.resources[q].get("Properties", {})).get("RedrivePolicy")
        if rp:
            failure_targets.add(rp["deadLetterTargetArn"])
    for c in s.of_type("AWS::Lambda::EventInvokeConfig").values():
        failure_targets.add(s.resolve(c["Properties"])["DestinationConfig"]["OnFailure"]["Destination"])
    for r in s.of_type("AWS::Events::Rule").values():
        for t in s.resolve(r["Properties"])["Targets"]:
            assert "DeadLetterConfig" in t and t["RetryPolicy"]["MaximumRetryAttempts"] > 0
            failure_targets.add(t["DeadLetterConfig"]["Arn"])
    consumed = 0
    for q, q_arn in arn.items():
        props = s.resolve(s.resources[q].get("Properties", {}))
        if q_arn in consumers:
            consumed += 1
            fn = next(f for f in s.functions() if s.r.name(f) == consumers[q_arn])
            assert props["VisibilityTimeout"] >= 6 * s.resources[fn]["Properties"]["Timeout"], q
            rp = props["RedrivePolicy"]
            assert 1 < rp["maxReceiveCount"] <= 5 and rp["deadLetterTargetArn"] in arn.values(), q
            dlq = next(d for d, a in arn.items() if a == rp["deadLetterTargetArn"])
            dlq_props = s.resolve(s.resources[dlq]["Properties"])
            assert dlq_props["MessageRetentionPeriod"] > props["MessageRetentionPeriod"], q
        else:
            assert q_arn in failure_targets, f"{q} is neither consumed nor a place failures land"
    assert consumed == 1


def test_pass_role_only_to_ecs_tasks_and_only_the_gpu_tasks_roles() -> None:
    s = stack()
    roles = sorted(s.resolve({"Fn::GetAtt": [r, "Arn"]}) for r in ("GpuTaskRole", "GpuTaskExecutionRole"))
    found = 0
    for p in PRINCIPALS:
        for st in statements(s, p):
            if "iam:PassRole" in listed(st["Action"]) or any(a in ("iam:*", "*") for a in listed(st["Action"])):
                found += 1
                assert listed(st["Action"]) == ["iam:PassRole"] and sorted(listed(st["Resource"])) == roles, p
                assert st["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}, p
    assert found == 1  # the splitter (POST /jobs hands its splits to it too)
    assert not any(
        "iam:PassRole" in json.dumps(statements(stack(GpuImageUri=""), p)) for p in ("ApiFunction", "S3EventFunction")
    )


def test_run_task_only_on_the_gpu_task_family() -> None:
    s = stack()
    family = s.resolve(s.resources["GpuTaskDefinition"]["Properties"]["Family"])
    td = s.resolve({"Ref": "GpuTaskDefinition"})
    assert td.endswith(f"task-definition/{family}:1")
    for p in PRINCIPALS:
        runs = allows(s, p, "ecs:RunTask", td)
        assert runs == (p == "S3EventFunction"), p
        assert not allows(s, p, "ecs:RunTask", td.replace(family, "some-other-family")), p


def test_api_has_reserved_concurrency() -> None:
    assert stack().resolve(stack().resources["ApiFunction"]["Properties"])["ReservedConcurrentExecutions"] == 40
    none = stack(ApiReservedConcurrency="0").resolve(
        stack(ApiReservedConcurrency="0").resources["ApiFunction"]["Properties"]
    )
    assert "ReservedConcurrentExecutions" not in none  # 0 reserves none (it would throttle everything)


def test_the_api_prices_jobs_at_the_workers_memory() -> None:
    """GET /jobs/{id}'s cost comes from WORKER_MEMORY_MB, else the answering function's own memory:
    the API must be told the workers' (its own may differ)."""
    s = stack()
    worker = s.resolve(s.resources["WorkerFunction"]["Properties"])
    for name in ("ApiFunction", "WorkerFunction"):
        env = s.resolve(s.resources[name]["Properties"])["Environment"]["Variables"]
        assert env["WORKER_MEMORY_MB"] == str(worker["MemorySize"]), name


def test_start_attempts_match_lambdas_retries_of_the_s3_event() -> None:
    s = stack()
    [cfg] = [
        c
        for c in s.of_type("AWS::Lambda::EventInvokeConfig").values()
        if s.resolve(c["Properties"])["FunctionName"] == s.r.name("S3EventFunction")
    ]
    retries = s.resolve(cfg["Properties"])["MaximumRetryAttempts"]
    assert int(s.env("S3EventFunction")["JOB_START_ATTEMPTS"]) == retries + 1


def test_incomplete_uploads_are_aborted_by_their_writer_or_the_lifecycle() -> None:
    """The merge and the GPU task stream outputs as multipart uploads: the writer aborts a failed
    one (it may), and the bucket aborts any a dead process left after a day."""
    s = stack()
    bucket = s.r.name("DataBucket")
    rules = s.resolve(s.resources["DataBucket"]["Properties"]["LifecycleConfiguration"]["Rules"])
    [abort] = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert (
        abort["Status"] == "Enabled"
        and abort["Prefix"] == ""
        and abort["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] <= 7
    )
    for p in ("WorkerFunction", "GpuTaskRole"):
        for key in ("scored/x_scored.csv", "results/any.csv"):
            assert allows(s, p, "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}"), (p, key)
            assert allows(s, p, "s3:AbortMultipartUpload", f"arn:aws:s3:::{bucket}/{key}"), (p, key)


def test_gpu_container_knows_its_region() -> None:
    s = stack()
    env = s.container_env("GpuTaskDefinition")
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"


def test_task_stopped_rule_matches_the_real_event_and_nothing_else() -> None:
    """The rule's pattern against events/ecs_task_stopped.json (the ECS "Task State Change" shape),
    evaluated by moto's EventBridge pattern matcher."""
    from moto.events.models import EventPattern

    s = stack()
    [rule] = s.of_type("AWS::Events::Rule").values()
    props = s.resolve(rule["Properties"])
    [target] = props["Targets"]
    assert target["Arn"] == s.resolve({"Fn::GetAtt": ["GpuTaskStoppedFunction", "Arn"]})
    pattern = EventPattern.load(json.dumps(props["EventPattern"]))
    event = json.loads((ROOT / "events" / "ecs_task_stopped.json").read_text())
    event["detail"]["clusterArn"] = s.resolve({"Fn::GetAtt": ["GpuCluster", "Arn"]})
    assert pattern.matches_event(event)
    for change in (
        {"lastStatus": "RUNNING"},
        {"clusterArn": "arn:aws:ecs:us-east-1:123456789012:cluster/another"},
        {"startedBy": "ecs-svc/123"},
    ):
        assert not pattern.matches_event({**event, "detail": {**event["detail"], **change}}), change
    assert "GpuTaskStoppedFunction" not in stack(GpuImageUri="").of_type("AWS::Lambda::Function")


@pytest.mark.parametrize(
    "params",
    [{**GPU, "SubnetC": "subnet-cccc3333"}, {"GpuImageUri": ""}],
    ids=["gpu-three-subnets", "no-gpu-two-subnets"],
)
def test_translated_template_lints_clean(params: dict[str, str], tmp_path) -> None:
    from support.aws_template import translate

    out = tmp_path / "translated.json"
    out.write_text(json.dumps(translate(TEMPLATE, params)))
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    r = subprocess.run([str(cfn_lint), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_post_jobs_hands_the_split_to_the_splitter() -> None:
    """POST /jobs answers within API Gateway's 29 s whatever the file's size: the API invokes the
    S3 event function (asynchronously, with its retries and on-failure destination) to split it,
    and may invoke nothing else; the splitter may read any input and write any output POST /jobs
    accepts, but never where uploads start jobs."""
    s = stack()
    bucket = s.r.name("DataBucket")
    splitter = s.resolve({"Fn::GetAtt": ["S3EventFunction", "Arn"]})
    assert s.env("ApiFunction")["SPLITTER_FUNCTION"] == s.r.name("S3EventFunction")
    for p in PRINCIPALS:
        assert allows(s, p, "lambda:InvokeFunction", splitter) == (p == "ApiFunction"), p
    assert not allows(s, "ApiFunction", "lambda:InvokeFunction", splitter.replace("splitter", "worker"))
    for key in ("uploads/2024/x.csv", "results/x.csv", "scored/x.csv"):
        assert allows(s, "S3EventFunction", "s3:GetObjectVersion", f"arn:aws:s3:::{bucket}/{key}"), key
        assert allows(s, "S3EventFunction", "s3:PutObject", f"arn:aws:s3:::{bucket}/{key}"), key
    assert not allows(s, "S3EventFunction", "s3:PutObject", f"arn:aws:s3:::{bucket}/incoming/x.csv")
