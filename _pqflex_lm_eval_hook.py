"""Import hook run at interpreter start-up (``pqflex_lm_eval.pth``): loads pqflex's lm-eval glue with lm-eval.

``lm_eval --model hf --model_args pretrained=PATH,attn_implementation=pqcache`` runs in lm-eval's own process, which
never imports pqflex, so transformers would not know ``"pqcache"``. lm-eval has no plugin discovery for models
(its registry takes entry-point objects but never looks them up from installed packages), so a ``.pth`` line is
the one packaging mechanism that reaches that process. It costs one small module at start-up: this one imports
nothing beyond ``sys`` until ``lm_eval.models.huggingface`` is imported, then calls
:func:`pqflex.integrations.lm_eval.patch` on it. If pqflex cannot be imported or patched (say after an
incompatible upgrade), it warns and leaves lm-eval as it was.
"""

import sys

_TARGET = "lm_eval.models.huggingface"


class _LmEvalFinder:
    """A meta path finder (duck-typed: ``importlib.abc`` alone costs 60 modules at start-up)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # the real spec, from the other finders; once
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                from pqflex.integrations import lm_eval as glue

                glue.patch(module)
            except Exception as e:  # never break lm-eval for a pqflex problem
                import warnings

                warnings.warn(f"pqflex: attn_implementation='pqcache' is unavailable in lm-eval ({type(e).__name__}: "
                              f"{e}); lm-eval runs without it", RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_and_patch
        return spec


if not any(isinstance(f, _LmEvalFinder) for f in sys.meta_path) and _TARGET not in sys.modules:
    sys.meta_path.insert(0, _LmEvalFinder())
