"""The one error of the benchmarks."""


class BenchError(RuntimeError):
    """The bench could not measure what it claims to measure (e.g. mixes != zones)."""
