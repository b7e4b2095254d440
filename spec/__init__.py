"""qcow2 as declarative construct schemas, shared helpers and the rules catalogue.

The one package both model/ and impl/ may import (DESIGN.md, "The dependency rule").
"""
