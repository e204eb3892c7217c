"""Ordered, reliable, multi-frame messaging between peers: tcp, webrtc, memory.

Knows nothing about tensors; see `base` for the contract and the error tree.
"""
