"""What the tests and the benchmarks need beside the product: never installed."""
