from benchmarks import common  # noqa: F401  (sets the allocator before torch allocates)
