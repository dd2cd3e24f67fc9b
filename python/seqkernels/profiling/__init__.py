"""Speed and memory measurement shared by bench/ and the seqkernels-bench CLI."""

from .memory import MemoryResult, measure_peak_memory
from .timing import Timing, attention_flops, measure_time, measure_times_interleaved

__all__ = ["MemoryResult", "Timing", "attention_flops", "measure_peak_memory", "measure_time",
           "measure_times_interleaved"]
