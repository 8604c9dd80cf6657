"""The harness around the library: the ``pqflex`` CLI, the demo, benchmarks, the evaluation suite, model loaders.

It imports pqflex through its public API only; the library never imports it.
"""
