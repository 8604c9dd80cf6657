"""Merge `pqflex eval --json` files into one, renaming the pqcache rows of each file (to compare PQ settings).

Usage::

    python evals/combine.py OUT.json A.json:pqcache-M2-nbits6 B.json:pqcache-M8-nbits8 ...

``FILE:NAME`` renames that file's ``pqcache`` rows to ``NAME``; a plain ``FILE`` keeps them. The environment of
the first file is kept. ``pqflex eval --from-json OUT.json --plot OUT.png`` then tables and plots them together.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, merged = argv[0], None
    for item in argv[1:]:
        path, _, name = item.partition(":")
        with open(path) as f:
            data = json.load(f)
        rows = [dict(r, method=name) if name and r["method"] == "pqcache" else r for r in data["rows"]]
        if merged is None:
            merged = {**data, "rows": rows, "sources": [item]}
        else:
            merged["rows"] += rows
            merged["sources"].append(item)
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
