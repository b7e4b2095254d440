"""Benchmarks behind ``qcow2lab bench``: the differential harness's throughput (harness.py)
and ``qcow2lab check`` against ``qemu-img check`` (check.py)."""
