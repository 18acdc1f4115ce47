"""Generate exod/proto from protos/ (python, mypy stubs, gRPC stubs).

Generated files are checked in; `--check` fails when they are stale, so CI catches a proto edited
without regenerating. protoc writes `from exo.v1 import x_pb2`; we root the package under
`exod.proto` so the wheel does not claim a top-level `exo` package.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no stubs

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "exod" / "proto"


def generate(out: Path) -> None:
    import grpc_tools

    # The mypy-protobuf plugins are console scripts beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        text = text.replace("from exo.v1 import", "from exod.proto.exo.v1 import")
        text = text.replace("import exo.v1.", "import exod.proto.exo.v1.")
        text = text.replace(" exo.v1.", " exod.proto.exo.v1.").replace(
            "[exo.v1.", "[exod.proto.exo.v1."
        )
        path.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def main() -> None:
    check = "--check" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "proto"
        out.mkdir()
        generate(out)
        if check:
            cmp = filecmp.dircmp(out, TARGET)
            if _differs(cmp):
                sys.exit("exod/proto is stale: run ./dev proto and commit the result")
            return
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(out, TARGET)
        print(f"wrote {TARGET.relative_to(ROOT)}")


def _differs(cmp: filecmp.dircmp[str]) -> bool:
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return True
    return any(_differs(sub) for sub in cmp.subdirs.values())


if __name__ == "__main__":
    main()
