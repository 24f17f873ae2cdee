"""Regenerate kvstore_pb2.py and kvstore_pb2_grpc.py from kvstore.proto.

    python -m kvstore.proto.generate

`make proto` runs it with grpcio-tools 1.78 in a venv of its own (.venv-proto): code from 1.78 imports on
protobuf 6.31+ and 7.x (newer grpcio-tools write code that demands their own protobuf major). protoc writes
`import kvstore_pb2`; the package needs a relative import, fixed here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc

    status = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={HERE}", f"--grpc_python_out={HERE}",
                          str(HERE / "kvstore.proto")])
    if status != 0:
        print("protoc failed", file=sys.stderr)
        return status
    grpc_file = HERE / "kvstore_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = re.sub(r"^import kvstore_pb2 as", "from . import kvstore_pb2 as", text, flags=re.MULTILINE)
    if fixed == text and "from . import kvstore_pb2" not in text:
        print("did not find the absolute import to fix", file=sys.stderr)
        return 1
    grpc_file.write_text(fixed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
