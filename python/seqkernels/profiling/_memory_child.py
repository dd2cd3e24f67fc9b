"""Subprocess body of the CPU memory measurement: ``python -m seqkernels.profiling._memory_child CASE PARAMS``."""

import json
import sys

from .cases import build_case
from .memory import cpu_peak_of

if __name__ == "__main__":
    case, params = sys.argv[1], json.loads(sys.argv[2])
    fn = build_case(case, params, "cpu")
    print(json.dumps({"peak_bytes": cpu_peak_of(fn)}))
