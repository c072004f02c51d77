"""Recorded episodes and what training reads from them: records, tensors, samplers, the columnar store, formats."""
