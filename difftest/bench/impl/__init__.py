"""``qcow2lab bench impl [ROW]``: impl against the seed results and QEMU's own tools
(issue 13). One module per row family: io_rows (request paths), cache_rows (the talk's
cache and slice figures, open of 2 TiB), difftest_row; registry lists the rows in order."""
