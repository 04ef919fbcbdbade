"""The template's optional embedding cache: off by default, reachable only from the functions'
security group, and wired into every scoring function and the GPU task through SIMILARITY_CACHE."""

from __future__ import annotations

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


SCORERS = ("ApiFunction", "WorkerFunction")  # the functions that score pairs, in the VPC


@pytest.mark.parametrize("extra", [{}, {"SubnetC": "subnet-cccc3333"}], ids=["two-subnets", "three-subnets"])
def test_elasticache_serverless_in_the_functions_subnets(tpl, extra) -> None:
    from support.aws_template import Stack

    cache = tpl["Resources"]["EmbeddingCache"]
    assert cache["Type"] == "AWS::ElastiCache::ServerlessCache"
    props = cache["Properties"]
    assert props["Engine"] == {"Ref": "EmbeddingCacheEngine"}
    assert props["SecurityGroupIds"] == [{"Ref": "EmbeddingCacheSecurityGroup"}]
    assert props["CacheUsageLimits"]["DataStorage"] == {"Maximum": {"Ref": "EmbeddingCacheMaxGB"}, "Unit": "GB"}
    s = Stack.of(ROOT / "template.yaml", "simtest", {"EmbeddingCacheEngine": "valkey", **extra})
    subnets = sorted(s.resolve(s.resources["EmbeddingCache"]["Properties"]["SubnetIds"]))
    assert len(subnets) == 2 + bool(extra)
    for name in SCORERS:
        assert sorted(s.resolve(s.resources[name]["Properties"]["VpcConfig"]["SubnetIds"])) == subnets, name


def test_only_the_functions_security_group_reaches_it(tpl) -> None:
    sg = tpl["Resources"]["EmbeddingCacheSecurityGroup"]["Properties"]
    assert sg["VpcId"] == {"Ref": "VpcId"}
    [rule] = sg["SecurityGroupIngress"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 6379, 6380)
    assert rule["SourceSecurityGroupId"] == {"Ref": "FunctionSecurityGroup"}
    assert "CidrIp" not in rule and "CidrIpv6" not in rule
    # ... and that group is the one every function in the VPC and the GPU task run in
    fns = {k: v for k, v in tpl["Resources"].items() if v["Type"] == "AWS::Serverless::Function"}
    for name, fn in fns.items():
        if "VpcConfig" in fn["Properties"]:
            assert fn["Properties"]["VpcConfig"]["SecurityGroupIds"] == [{"Ref": "FunctionSecurityGroup"}], name
    assert set(SCORERS) <= {n for n, f in fns.items() if "VpcConfig" in f["Properties"]}
    launch = tpl["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert launch["SecurityGroupIds"] == [{"Ref": "FunctionSecurityGroup"}]


def test_every_scorer_gets_the_cache_through_similarity_cache(tpl) -> None:
    assert "SIMILARITY_CACHE" not in tpl["Globals"]["Function"]["Environment"]["Variables"]
    fns = {k: v for k, v in tpl["Resources"].items() if v["Type"] == "AWS::Serverless::Function"}
    for name, fn in fns.items():  # the scorers have it; the functions outside the VPC do not
        fn_env = fn["Properties"].get("Environment", {}).get("Variables", {})
        assert (fn_env.get("SIMILARITY_CACHE") == CACHE_URL) == (name in SCORERS), name
    [container] = tpl["Resources"]["GpuTaskDefinition"]["Properties"]["ContainerDefinitions"]
    gpu_env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert gpu_env["SIMILARITY_CACHE"] == CACHE_URL


def test_both_values_the_template_can_set_are_valid_settings() -> None:
    on = CacheConfig(store="rediss://emb-abc123.serverless.use1.cache.amazonaws.com:6379")
    assert on.store.startswith("rediss://")  # TLS: ElastiCache Serverless only speaks TLS
    assert CacheConfig(store="").store == ""  # empty: the services' default, no cache


def test_sam_transform_with_the_cache_on_lints_clean(tmp_path) -> None:
    from support.aws_template import translate

    out = translate(ROOT / "template.yaml", {"GpuImageUri": "x/y:gpu", "EmbeddingCacheEngine": "valkey"})
    fns = {k: v for k, v in out["Resources"].items() if v["Type"] == "AWS::Lambda::Function"}
    for name in ("ApiFunction", "WorkerFunction"):
        assert fns[name]["Properties"]["Environment"]["Variables"]["SIMILARITY_CACHE"] == CACHE_URL
    path = tmp_path / "translated.json"
    path.write_text(json.dumps(out))
    r = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
