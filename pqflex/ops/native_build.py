"""Build the native CPU kernels (``cpu_kernels.c``) into ``pqflex/ops/_cpu_kernels.so``: when the wheel is built.

Plain C with no torch headers, so one binary serves every torch. ``hatch_build.py`` (the build hook of
``pip install .`` and ``pip install -e .``) calls :func:`build`; nothing compiles at a user's run time. Without a C
compiler at install time the package installs without the kernels and :func:`pqflex.ops.native.library` says so
once, then the plain-torch code runs. ``python -m pqflex.ops.native_build`` rebuilds in place (a checkout used
without installing, e.g. on a machine with no package index).

This module imports only the standard library: the build hook loads it by path, before torch exists.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
LIBRARY = Path(__file__).with_name("_cpu_kernels.dll" if sys.platform == "win32" else "_cpu_kernels.so")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-fvisibility=hidden")


def source_digest() -> str:
    """sha256 (16 hex digits) of the C source: built into the library, checked when it is loaded."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def compiler(environ: dict[str, str] | None = None) -> list[str] | None:
    """The C compiler command: ``$CC`` split like a shell word list (``CC="gcc -O2"`` keeps its flags), else the
    first of ``cc``, ``gcc`` and ``clang`` on the PATH; None if there is none."""
    env = os.environ if environ is None else environ
    if env.get("CC", "").strip():
        return shlex.split(env["CC"])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def build(target: Path = LIBRARY, command: list[str] | None = None) -> Path:
    """Compile :data:`SOURCE` into ``target`` (written aside, then renamed into place); returns ``target``.

    Raises ``RuntimeError`` naming the command when there is no compiler or it fails.
    """
    command = compiler() if command is None else command
    if not command:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [*command, *FLAGS, f'-DPQFLEX_SOURCE_DIGEST="{source_digest()}"', str(SOURCE), "-o", str(out), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
        os.replace(out, target)
    return target


if __name__ == "__main__":
    print(build())
