"""The optimized qcow2 implementation. Not built yet (see the impl issue)."""
