"""What tests and benchmarks share: fakes of the benchmarks' layouts and PyTorch references."""
