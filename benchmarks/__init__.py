"""Microbenchmarks of l2r_cuda (run ``python -m benchmarks.route --help``)."""
