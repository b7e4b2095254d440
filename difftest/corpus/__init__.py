"""Damaged images: the corruption-mutant corpus (mutate.py) and the fuzz harness that runs
every reader on it in a sandboxed worker (fuzz.py)."""
