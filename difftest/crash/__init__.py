"""Crash consistency (issue 17): record an engine's host I/O while it runs random operation
sequences, rebuild what a power cut could leave on the disk, and judge every such state.

Modules, one concern each:
- ``ops``: the guest operations and their Hypothesis strategy;
- ``engines``: opening model and impl with the recorder in their host-file layers;
- ``recording``: one engine's host calls while it runs the operations, split per operation;
- ``qemu``: the same for qemu-io, through QEMU's blklogwrites filter;
- ``states``: the crash states of a recorded stream (prefixes, reorderings after the last
  flush, torn writes) and the bytes each leaves on the disk;
- ``oracle``: which guest content each sector may hold after a crash;
- ``judge``: qemu-img check, guest content, and cross-reads by every engine and qemu;
- ``campaign``: one example end to end, and the Hypothesis campaign that shrinks failures;
- ``repro``: the reproducer (fresh image + operations + the writes that reached the disk).
"""
