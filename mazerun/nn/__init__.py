"""Networks: encoders, recurrent cores, policy and value heads, and the checkpoint file that rebuilds them."""
