"""Regenerate the committed Python code for the mesh's .proto files (needs grpcio-tools).

    python proto/generate.py            # writes tracemesh/_proto/*_pb2.py, *_pb2_grpc.py
    python proto/generate.py --out DIR  # somewhere else (the test compares the two)

protoc names a generated module after the .proto's path (``tracemesh/mesh/v1/discovery.proto``
imports as ``tracemesh.mesh.v1.discovery_pb2``, which is not a package here), so the modules are
moved to ``tracemesh._proto`` and the two places that name the module are rewritten; the
descriptor keeps the full path as its file name, so it cannot collide in protobuf's global pool
with another project's ``discovery.proto``. The generated code is committed so that an install
needs no protoc.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = ["tracemesh/mesh/v1/discovery.proto"]
PACKAGE = "tracemesh._proto"
DEFAULT_OUT = ROOT.parent / "tracemesh" / "_proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    written = []
    for rel in PROTOS:
        src = ROOT / rel
        module = rel.removesuffix(".proto").replace("/", ".")  # tracemesh.mesh.v1.discovery
        package, _, name = module.rpartition(".")
        with tempfile.TemporaryDirectory() as tmp:
            code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp}",
                                f"--grpc_python_out={tmp}", str(src)])
            if code != 0:
                raise SystemExit(f"protoc failed on {rel} (exit {code})")
            for f in sorted(Path(tmp, *package.split(".")).glob("*.py")):
                text = f.read_text()
                text = text.replace(f"from {package} import {name}_pb2", f"from {PACKAGE} import {name}_pb2")
                text = text.replace(f"'{module}_pb2'", f"'{PACKAGE}.{name}_pb2'")
                dest = out / f.name
                dest.write_text(text)
                written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
