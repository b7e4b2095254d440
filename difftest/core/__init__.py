"""The lockstep core: Hypothesis drives several targets in lockstep and cross-checks them.

- lockstep.py: ``Lockstep``, one operation on every target, then the comparisons;
- machine.py: the Hypothesis state machine that draws the operations;
- campaign.py: profiles, seeds, shards and their statistics;
- config.py: the image configuration drawn once per example;
- targets.py: the implementations stepped (in-process modules, qemu-io, command adapters) and
  the shared backing chain;
- introspect.py: what the harness may ask a target beyond the Image interface;
- qemuio.py: the persistent qemu-io process behind the qemu target;
- teardown.py: the end-of-run checks of every file; oracle.py: qemu-img's verdict on a file;
- divergence.py: ``Divergence``, the harness's one verdict;
- repro.py: the shell and pytest reproducers of a divergence.
"""
