"""One training run of a comparison in its own process (``run_compare(jobs > 1)``).

    python -m hyperconn.experiments.worker LABEL CONFIG_JSON

Imports the user's modules named in ``HYPERCONN_IMPORT`` first (so their variants are
registered), trains the run, prints one line, and exits 0, or 1 with the error as the
last line of stderr. A separate interpreter rather than a multiprocessing pool: the
caller's ``__main__`` is never re-imported.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from ..cli import IMPORT_ENV, import_user_modules
    from .compare import _train_one

    if len(argv) != 2:
        print("usage: python -m hyperconn.experiments.worker LABEL CONFIG_JSON", file=sys.stderr)
        return 2
    label, config = argv[0], json.loads(argv[1])
    import_user_modules([m for m in os.environ.get(IMPORT_ENV, "").split(",") if m.strip()])
    _, error = _train_one(config, label, quiet=True)
    if error:
        print(error, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
