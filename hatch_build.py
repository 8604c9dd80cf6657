"""Build hook of the wheel (hatchling): compiles pqflex's native CPU kernels into the package.

``pip install .`` ships ``pqflex/ops/_cpu_kernels.so`` in a platform wheel; ``pip install -e .`` writes it into the
checkout (git ignores it). Without a C compiler the build goes on without it, says so, and pqflex runs its
plain-torch CPU code (one warning at run time). See ``pqflex/ops/native_build.py``.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _native_build():
    path = Path(__file__).parent / "pqflex" / "ops" / "native_build.py"
    spec = importlib.util.spec_from_file_location("_pqflex_native_build", path)  # stdlib only: no torch here
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if self.target_name != "wheel":
            return
        native = _native_build()
        relative = native.LIBRARY.relative_to(Path(self.root)).as_posix()
        try:
            if version == "editable":  # the package is the checkout: build in place
                native.build()
                return
            self._tmp = tempfile.TemporaryDirectory()
            built = native.build(Path(self._tmp.name) / native.LIBRARY.name)
        except RuntimeError as err:
            print(f"pqflex: building without the native CPU kernels ({err}); the CPU runs plain-torch code",
                  file=sys.stderr)
            return
        build_data["force_include"][str(built)] = relative
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version, build_data, artifact_path):
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
