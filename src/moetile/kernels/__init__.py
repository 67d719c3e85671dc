"""Triton kernels only: no policy, no input validation (see moetile.ops and moetile.schedule)."""
