"""Opt-in fast kernels (hand-written gradients, stacked networks, Adam); each proves itself against autograd."""
