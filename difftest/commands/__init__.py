"""One module per qcow2lab verb; see difftest/cli.py."""
