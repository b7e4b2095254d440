"""The differential tester and the qcow2lab command line (DESIGN.md: the only package that may
import spec, model and impl together). One subpackage per concern, no cycles
(tests/test_layering.py):

- core/: the lockstep tester (Lockstep, the Hypothesis machine, campaigns, targets, qemu-io,
  teardown checks, reproducers);
- corpus/: damaged images (the mutant corpus) and the fuzz harness;
- bench/: the benchmarks of ``qcow2lab bench``;
- cli/: the ``qcow2lab`` command line, one module per verb;
- adapters/: foreign implementations as targets or readers.
"""
