"""Glue with other libraries (transformers, lm-eval); no math lives here."""
