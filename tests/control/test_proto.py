"""The committed generated code in tracemesh/_proto is what proto/*.proto generates."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools is not installed (it is in the test extras: pip install -e '.[test]')")
def test_committed_code_is_what_the_proto_generates(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    generated = sorted(p.name for p in tmp_path.glob("*.py"))
    assert generated == ["discovery_pb2.py", "discovery_pb2_grpc.py"]
    for name in generated:
        committed = (REPO / "tracemesh" / "_proto" / name).read_text()
        assert (tmp_path / name).read_text() == committed, \
            f"tracemesh/_proto/{name} is stale: run `python proto/generate.py` and commit the result"


def test_generated_code_round_trips_on_the_installed_runtime():
    from tracemesh._proto import discovery_pb2 as pb

    assert pb.DESCRIPTOR.name == "tracemesh/mesh/v1/discovery.proto"
    req = pb.DiscoveryRequest(node=pb.Node(service="catalog", version="v2", address="127.0.0.1:9001",
                                           ports={"http": 9001}, healthy=True))
    back = pb.DiscoveryRequest.FromString(req.SerializeToString())
    assert back.node.ports["http"] == 9001 and back.HasField("node") and not back.HasField("error_detail")
