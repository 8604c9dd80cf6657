"""Import hook run at interpreter start-up (``pqflex_lm_eval.pth``): loads pqflex's lm-eval glue with lm-eval.

``lm_eval --model hf --model_args pretrained=PATH,attn_implementation=pqcache`` runs in lm-eval's own process, which
never imports pqflex, so transformers would not know ``"pqcache"``. This module (standard library only, nothing
imported at start-up) waits for ``lm_eval.models.huggingface`` to be imported and then calls
:func:`pqflex.integrations.lm_eval.patch` on it. Processes that never import lm-eval are untouched.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.models.huggingface"


class _LmEvalFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # the real spec, from the other finders; once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            from pqflex.integrations import lm_eval as glue

            glue.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if not any(isinstance(f, _LmEvalFinder) for f in sys.meta_path) and _TARGET not in sys.modules:
    sys.meta_path.insert(0, _LmEvalFinder())
