"""Per-architecture transformer blocks, span loading and the client-side head.

Knows nothing about networking; see `base` for the adapter contract.
"""
