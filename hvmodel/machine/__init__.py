"""The machine: the pool of machine frames every VM shares, and the swap device."""
