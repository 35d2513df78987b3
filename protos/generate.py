"""Regenerate the Python stubs of the wire contract from the .proto files under protos/.

Usage::

    python protos/generate.py              # rewrite protos/sdce/surrogate/v1/*_pb2*.py(i) in place
    python protos/generate.py --out DIR    # write the same tree under DIR (the regeneration test)

Writes ``surrogate_pb2.py``, ``surrogate_pb2_grpc.py`` and ``surrogate_pb2.pyi`` next to
the .proto, plus empty ``__init__.py`` files so ``from protos.sdce.surrogate.v1 import
surrogate_pb2`` works. protoc emits an absolute ``from sdce.surrogate.v1 import ...`` in
the gRPC stub; it is rewritten to a relative import so the package can live anywhere.
The generated code depends on the grpcio-tools version: regenerate after upgrading it.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = ("sdce/surrogate/v1/surrogate.proto",)
# "from sdce.surrogate.v1 import surrogate_pb2 as ..." -> "from . import surrogate_pb2 as ..."
_ABSOLUTE_IMPORT = re.compile(r"^from ([\w.]+) import (\w+_pb2)", re.MULTILINE)


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on PROTOS into ``out_dir``; returns the generated files (``__init__.py`` excluded)."""
    from grpc_tools import protoc  # imported late: only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_ROOT / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}; see its message above")
    generated = []
    for proto in PROTOS:
        stem = out_dir / proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.with_name(stem.name + suffix)
            _relativise_imports(path, package=str(Path(proto).parent).replace("/", "."))
            generated.append(path)
        _touch_init_files(out_dir, Path(proto).parent)
    return generated


def _relativise_imports(path: Path, package: str) -> None:
    """Rewrite imports of sibling generated modules (same proto package) to relative ones."""
    text = path.read_text()
    fixed = _ABSOLUTE_IMPORT.sub(lambda m: f"from . import {m[2]}" if m[1] == package else m[0], text)
    if fixed != text:
        path.write_text(fixed)


def _touch_init_files(out_dir: Path, package_dir: Path) -> None:
    """Empty ``__init__.py`` in out_dir and every folder down to package_dir."""
    folder = out_dir
    for part in ("", *package_dir.parts):
        folder = folder / part
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="root of the generated package tree")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
