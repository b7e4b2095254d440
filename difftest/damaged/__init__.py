"""Damaged images in lockstep with QEMU (``qcow2lab difftest --damaged``).

Each example starts from a damaged image of the fuzz corpus (difftest/corpus/mutate.py: the
named mutations and seeded bit flips over images qemu-img and qemu-io wrote), opens it in
every engine and in qemu-io, runs random guest requests and compares, step by step, the
bytes or the error class, the corrupt flag, what a read-write reopen does and, at the end,
``qemu-img check``'s verdict on every file. ``campaign`` runs and shrinks examples,
``repro`` writes what a finding needs to be run again.
"""
