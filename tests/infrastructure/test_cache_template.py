"""The template's optional embedding cache: off by default, reachable only from the functions'
security group, and wired into every scoring function and the GPU task through SIMILARITY_CACHE."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode

from similarity.config import CacheConfig

ROOT = Path(__file__).resolve().parents[2]
CACHE_URL = {
    "Fn::If": [
        "CacheEnabled",
        {"Fn::Sub": "rediss://${EmbeddingCache.Endpoint.Address}:${EmbeddingCache.Endpoint.Port}"},
        "",
    ]
}


@pytest.fixture(scope="module")
def tpl() -> dict:
    template, matches = decode(str(ROOT / "template.yaml"))
    assert not matches, matches
    return template


def test_the_cache_is_optional_and_off_by_default(tpl) -> None:
    engine = tpl["Parameters"]["EmbeddingCacheEngine"]
    assert engine["Default"] == "none" and set(engine["AllowedValues"]) == {"none", "valkey", "redis"}
    assert tpl["Conditions"]["CacheEnabled"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "EmbeddingCacheEngine"}, "none"]}]}
    cache_resources = {k for k, v in tpl["Resources"].items() if "EmbeddingCache" in k}
    assert cache_resources == {"EmbeddingCache", "EmbeddingCacheSecurityGroup"}
    assert all(tpl["Resources"][k].get("Condition") == "CacheEnabled" for k in cache_resources)
    assert tpl["Outputs"]["EmbeddingCacheEndpoint"]["Condition"] == "CacheEnabled"


def test_elasticache_serverless_in_the_functions_subnets(tpl) -> None:
    cache = tpl["Resources"]["EmbeddingCache"]
    assert cache["Type"] == "AWS::ElastiCache::ServerlessCache"
    props = cache["Properties"]
    assert props["Engine"] == {"Ref": "EmbeddingCacheEngine"}
    assert props["SubnetIds"] == {"Ref": "SubnetIds"} == tpl["Globals"]["Function"]["VpcConfig"]["SubnetIds"]
    assert props["SecurityGroupIds"] == [{"Ref": "EmbeddingCacheSecurityGroup"}]
    assert props["CacheUsageLimits"]["DataStorage"] == {"Maximum": {"Ref": "EmbeddingCacheMaxGB"}, "Unit": "GB"}


def test_only_the_functions_security_group_reaches_it(tpl) -> None:
    sg = tpl["Resources"]["EmbeddingCacheSecurityGroup"]["Properties"]
    assert sg["VpcId"] == {"Ref": "VpcId"}
    [rule] = sg["SecurityGroupIngress"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 6379, 6380)
    assert rule["SourceSecurityGroupId"] == {"Ref": "FunctionSecurityGroup"}
    assert "CidrIp" not in rule and "CidrIpv6" not in rule
    # ... and that group is the one every function and the GPU task run in
    assert tpl["Globals"]["Function"]["VpcConfig"]["SecurityGroupIds"] == [{"Ref": "FunctionSecurityGroup"}]
    fns = {k: v for k, v in tpl["Resources"].items() if v["Type"] == "AWS::Serverless::Function"}
    assert all("VpcConfig" not in f["Properties"] for f in fns.values())  # none leaves the group
    launch = tpl["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert launch["SecurityGroupIds"] == [{"Ref": "FunctionSecurityGroup"}]


def test_every_scorer_gets_the_cache_through_similarity_cache(tpl) -> None:
    env = tpl["Globals"]["Function"]["Environment"]["Variables"]
    assert env["SIMILARITY_CACHE"] == CACHE_URL
    for name in ("ApiFunction", "WorkerFunction"):  # no function overrides it
        fn_env = tpl["Resources"][name]["Properties"].get("Environment", {}).get("Variables", {})
        assert "SIMILARITY_CACHE" not in fn_env, name
    [container] = tpl["Resources"]["GpuTaskDefinition"]["Properties"]["ContainerDefinitions"]
    gpu_env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert gpu_env["SIMILARITY_CACHE"] == CACHE_URL


def test_both_values_the_template_can_set_are_valid_settings() -> None:
    on = CacheConfig(store="rediss://emb-abc123.serverless.use1.cache.amazonaws.com:6379")
    assert on.store.startswith("rediss://")  # TLS: ElastiCache Serverless only speaks TLS
    assert CacheConfig(store="").store == ""  # empty: the services' default, no cache


def test_sam_transform_with_the_cache_on_lints_clean(tpl, tmp_path) -> None:
    from samtranslator.translator.transform import transform

    doc = copy.deepcopy(tpl)
    for r in doc["Resources"].values():
        if r["Type"] == "AWS::Serverless::Function":
            r["Properties"]["ImageUri"] = "123456789012.dkr.ecr.us-east-1.amazonaws.com/similarity:lambda"

    class NoManagedPolicies:
        def load(self) -> dict:
            return {}

    params = {
        "VpcId": "vpc-0123456789abcdef0",
        "SubnetIds": "subnet-aaaa1111,subnet-bbbb2222",
        "GpuImageUri": "x/y:gpu",
        "EmbeddingCacheEngine": "valkey",
    }
    out = transform(doc, params, NoManagedPolicies())
    fns = {k: v for k, v in out["Resources"].items() if v["Type"] == "AWS::Lambda::Function"}
    for name in ("ApiFunction", "WorkerFunction"):
        assert fns[name]["Properties"]["Environment"]["Variables"]["SIMILARITY_CACHE"] == CACHE_URL
    path = tmp_path / "translated.json"
    path.write_text(json.dumps(out))
    r = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
