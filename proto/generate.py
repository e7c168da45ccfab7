"""Regenerate the Python modules from `nanoserve.proto`: `python -m proto.generate`.

The one way to regenerate, so the checked-in modules always come from the same command
(tests/proto checks they match the .proto). Paths are taken relative to the repo root, so
`from proto import nanoserve_pb2` works in the generated grpc module.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILE = Path("proto") / "nanoserve.proto"


def run_protoc(out_flags: list[str], proto_file: Path = REPO_ROOT / PROTO_FILE) -> None:
    """Run protoc on `proto_file` (under the repo root, or a copy's root) with the given output flags."""
    include_root = proto_file.resolve().parent.parent
    well_known_types = files("grpc_tools") / "_proto"  # google/protobuf/struct.proto and the like
    status = protoc.main(["grpc_tools.protoc", f"-I{include_root}", f"-I{well_known_types}", *out_flags,
                          str(proto_file.resolve())])
    if status != 0:
        raise RuntimeError(f"protoc failed on {proto_file} with exit status {status}")


def main() -> None:
    """Write nanoserve_pb2.py, nanoserve_pb2_grpc.py and nanoserve_pb2.pyi next to the .proto."""
    out = str(REPO_ROOT)
    run_protoc([f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"])


if __name__ == "__main__":
    main()
