"""``python -m seqkernels.bench``: the same as the ``seqkernels-bench`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
