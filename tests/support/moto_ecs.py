"""ECS on moto: a container instance for RunTask to place tasks on (moto needs an EC2 instance
and the identity document an ECS agent would send)."""

from __future__ import annotations

import json
from typing import Any


def register_instance(ecs: Any, ec2: Any, cluster: str, account_id: str = "123456789012") -> None:
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]
    doc = {
        "instanceId": inst["InstanceId"],
        "region": "us-east-1",
        "availabilityZone": inst["Placement"]["AvailabilityZone"],
        "instanceType": inst["InstanceType"],
        "imageId": ami,
        "privateIp": inst.get("PrivateIpAddress"),
        "accountId": account_id,
        "architecture": "x86_64",
        "version": "2010-8-31",
        "pendingTime": "2026-11-27T00:00:00Z",
    }
    ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(doc))
