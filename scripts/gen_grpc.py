"""Generate the Python modules of Kiln's gRPC API from kiln/serve/grpc/kiln.proto.

    python scripts/gen_grpc.py          # rewrite kiln/serve/grpc/kiln_pb2.py and kiln_pb2_grpc.py
    python scripts/gen_grpc.py --check  # exit 1 when the committed modules are not what the .proto gives

The modules are committed (a plain `pip install` needs no protoc); tests/server/test_grpc.py runs the check,
so an edit of the .proto without regenerating fails the tests. grpcio-tools is pinned in the `test` extra
(pyproject.toml): its version is written into the modules, and the runtime needs protobuf and grpcio at
least as new as the ones that generated them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("kiln/serve/grpc/kiln.proto")  # relative to ROOT: modules import each other as kiln.serve.grpc.*
OUTPUTS = ("kiln_pb2.py", "kiln_pb2_grpc.py")


def generate(out: Path) -> dict[str, str]:
    """Run protoc (grpcio-tools' own) into `out`; the generated modules' text by file name."""
    from grpc_tools import protoc  # deferred: grpcio-tools is a development tool, not a runtime dependency

    argv = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", str(ROOT / PROTO)]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    return {name: (out / PROTO.parent / name).read_text() for name in OUTPUTS}


def stale() -> list[str]:
    """The committed modules that differ from what the .proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [name for name, text in fresh.items() if (ROOT / PROTO.parent / name).read_text() != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed modules are current")
    args = parser.parse_args()
    if args.check:
        names = stale()
        if names:
            sys.exit(f"stale: {', '.join(names)}; run python scripts/gen_grpc.py")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (ROOT / PROTO.parent / name).write_text(text)
            print(f"wrote {PROTO.parent / name}")


if __name__ == "__main__":
    main()
