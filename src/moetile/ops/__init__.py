"""Public wrappers: validate and canonicalise inputs, ask moetile.schedule for a policy,
launch the Triton kernels (or fall back to moetile.reference on CPU without the interpreter)."""
