"""The conformance matrix (``qcow2lab conformance``): other qcow2 readers held to QEMU, one
short difftest campaign per feature area and reader.

- areas.py: the feature areas, each a set of pinned difftest Config fields;
- snapshots.py: the reader wrapper that reads internal snapshots through ``snapshot=``;
- matrix.py: running the cells and classifying each one (pass, wrong bytes, crash, hang,
  memory, error, unsupported) with its minimal reproducer;
- render.py: the matrix as a rich table, JSON or Markdown.
"""
