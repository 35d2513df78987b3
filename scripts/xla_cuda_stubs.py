"""Empty stand-ins for the CUDA 12 libraries that PyPI's torch 2.9.0 wheel links against.

Why: on Linux x86_64 the PyPI ``torch==2.9.0`` wheel is the CUDA 12.8 build. Its
dependency list names the CUDA runtime as ``nvidia-*`` wheels (several GB), and
even its CPU library (``libtorch_cpu.so``) has ``libcudart.so.12`` and
``libcupti.so.12`` as DT_NEEDED entries, so ``import torch`` fails without them:
``OSError: libcudart.so.12: cannot open shared object file``. The CPU build
(``2.9.0+cpu``) is not on PyPI. The XLA lane runs on the CPU (PJRT_DEVICE=CPU)
and never calls CUDA, so it only needs the dynamic loader to be satisfied.

What: for every CUDA library that torch's and torch_xla's shared objects need
but that cannot be found, this script compiles a tiny library with the same
soname and symbol versions whose functions do nothing: each returns 100
(``cudaErrorNoDevice`` for the runtime; an error for the others) and the
``*GetErrorString``-style ones return a message. ``torch.cuda.is_available()``
is then simply False. A ``.pth`` file preloads the stubs at interpreter start,
so every Python process of the environment (pytest, train.py, the processes
torch_xla.launch spawns) finds them without LD_LIBRARY_PATH.

    python scripts/xla_cuda_stubs.py .venv-xla   # after torch and torch_xla are installed

No NVIDIA code or package is involved: the stubs are generated from the symbol
tables of the installed torch wheel and compiled with the system C compiler.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

STUB_DIR = "cuda-stubs"
# Unversioned symbols are stubbed only when their name says they belong to CUDA.
CUDA_PREFIX = re.compile(r"(__)?(cu|nccl|nvshmem|nvrtc)")
# Where an unversioned symbol goes, by prefix (longest match wins); default: the runtime.
OWNERS = {"cu": "libcuda.so.1", "cuda": "libcudart.so.12", "curand": "libcurand.so.10", "cuFile": "libcufile.so.0",
          "cusparseLt": "libcusparseLt.so.0",
          "nccl": "libnccl.so.2", "nvshmem": "libnvshmem_host.so.3"}
RETURNS_STRING = re.compile(r"(Error|Status|Result)(String|Name)$")


def shared_objects(site: Path) -> list[Path]:
    """torch's and torch_xla's native libraries and extension modules."""
    return sorted((site / "torch" / "lib").glob("*.so*")) + sorted(site.glob("torch/_C*.so")) + sorted(site.glob("_XLAC*.so"))


def missing_libraries(objects: list[Path], site: Path) -> set[str]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(site / "torch" / "lib")}
    missing: set[str] = set()
    for obj in objects:
        out = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, env=env).stdout
        missing |= set(re.findall(r"^\s*(\S+) => not found", out, re.M))
    return missing


def version_needs(obj: Path, missing: set[str]) -> dict[str, str]:
    """{version name: library} for the symbol versions ``obj`` needs from missing libraries."""
    needs, current = {}, None
    for line in subprocess.run(["readelf", "-V", "-W", str(obj)], capture_output=True, text=True).stdout.splitlines():
        if match := re.search(r"File: (\S+)", line):
            current = match.group(1)
        elif (match := re.search(r"Name: (\S+)", line)) and current in missing:
            needs[match.group(1)] = current
    return needs


def dynamic_symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(defined names, undefined 'name[@version]' function references) of ``obj``'s dynamic symbol table."""
    defined, undefined = set(), set()
    for line in subprocess.run(["readelf", "--dyn-syms", "-W", str(obj)], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].rstrip(":").isdigit():
            continue
        kind, index, name = parts[3], parts[6], parts[7]
        if index != "UND":
            defined.add(name.split("@")[0])
        elif kind == "FUNC":
            undefined.add(name)
    return defined, undefined


def plan(site: Path) -> dict[str, dict[str | None, set[str]]]:
    """{library: {version name or None: function names}} to stub."""
    objects = shared_objects(site)
    missing = missing_libraries(objects, site)
    versions: dict[str, str] = {}
    defined: set[str] = set()
    undefined: set[str] = set()
    for obj in objects:
        versions.update(version_needs(obj, missing))
        found, wanted = dynamic_symbols(obj)
        defined |= found
        undefined |= wanted
    stubs: dict[str, dict[str | None, set[str]]] = {lib: collections.defaultdict(set) for lib in missing}
    for version, lib in versions.items():
        stubs[lib][version]  # every needed version must be defined, even with no function in it
    for ref in undefined:
        name, _, version = ref.partition("@")
        version = version.lstrip("@").split()[0] if version else None
        if version in versions:
            stubs[versions[version]][version].add(name)
        elif version is None and name not in defined and CUDA_PREFIX.match(name):
            stripped = name.lstrip("_")
            owner = next((OWNERS[p] for p in sorted(OWNERS, key=len, reverse=True) if stripped.startswith(p)), "libcudart.so.12")
            if owner in stubs:
                stubs[owner][None].add(name)
    return stubs


def build(lib: str, symbols: dict[str | None, set[str]], out: Path) -> None:
    """Compile ``out/lib`` with soname ``lib`` defining ``symbols`` under their versions."""
    versions = sorted(v for v in symbols if v is not None) or [lib]
    source = ['static const char message[] = "CUDA stub: no CUDA runtime in this environment";']
    script = []
    for i, version in enumerate(versions):
        names = sorted(symbols.get(version, set()) | (symbols.get(None, set()) if i == 0 else set()))
        marker = "sdce_stub_" + re.sub(r"\W", "_", version)  # a version node may not be empty
        source.append(f"int {marker} = 0;")
        for name in names:
            if RETURNS_STRING.search(name):
                source.append(f"const char *{name}(void) {{ return message; }}")
            else:
                source.append(f"long {name}(void) {{ return 100; }}")
        exported = " ".join(f"{n};" for n in [marker, *names])
        script.append(f"{version} {{ global: {exported} {'local: *; ' if i == 0 else ''}}};")
    stem = out / re.sub(r"\W", "_", lib)
    stem.with_suffix(".c").write_text("\n".join(source) + "\n")
    stem.with_suffix(".map").write_text("\n".join(script) + "\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out / lib), str(stem.with_suffix(".c")),
                    f"-Wl,-soname,{lib}", f"-Wl,--version-script={stem.with_suffix('.map')}"], check=True)


PRELOAD = '''"""Preload the CUDA stand-ins (scripts/xla_cuda_stubs.py) before torch is imported."""
import ctypes, glob, os
for _path in sorted(glob.glob(os.path.join({stub_dir!r}, "lib*.so*"))):
    ctypes.CDLL(_path, mode=ctypes.RTLD_GLOBAL)
'''


def main(argv: list[str]) -> int:
    venv = Path(argv[1] if len(argv) > 1 else ".venv-xla").resolve()
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    out = venv / STUB_DIR
    out.mkdir(exist_ok=True)
    stubs = plan(site)
    for lib, symbols in sorted(stubs.items()):
        build(lib, symbols, out)
        print(f"stub {lib}: {sum(len(s) for s in symbols.values())} functions")
    (site / "_sdce_cuda_stubs.py").write_text(PRELOAD.format(stub_dir=str(out)))
    (site / "sdce_cuda_stubs.pth").write_text("import _sdce_cuda_stubs\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
