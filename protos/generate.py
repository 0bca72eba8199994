"""Regenerate the committed gRPC code from ``netmoe/v1/placement.proto`` with grpc_tools.protoc.

protoc writes ``netmoe/v1/placement_pb2*.py`` under its output directory (paths mirror ``-I``); the
package ships them flat as ``netmoe.protos.placement_pb2*``, so they are moved up and the grpc
module's absolute import of its messages becomes a relative one.

Run: ``python -m netmoe.protos.generate [OUT_DIR]`` (default: this package's directory).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO = "netmoe/v1/placement.proto"
OUTPUTS = ("placement_pb2.py", "placement_pb2.pyi", "placement_pb2_grpc.py")
_ABSOLUTE_IMPORT = "from netmoe.v1 import placement_pb2 as"
_RELATIVE_IMPORT = "from . import placement_pb2 as"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # A child process: protoc run in-process after grpc and protobuf are loaded (a test
        # session, say) can corrupt the heap and abort.
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",  # grpc_tools: dev-only dependency
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}: {done.stderr.strip()}")
        written = []
        for name in OUTPUTS:
            src = Path(tmp) / "netmoe" / "v1" / name
            text = src.read_text()
            if name.endswith("_grpc.py"):
                if _ABSOLUTE_IMPORT not in text:
                    raise RuntimeError(f"{name}: expected import {_ABSOLUTE_IMPORT!r} not found")
                text = text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
            dst = out_dir / name
            dst.write_text(text)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else PROTO_ROOT
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
