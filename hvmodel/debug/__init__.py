"""Debugging a running guest: the GDB remote stub and the hypervisor's views (monitor)."""
