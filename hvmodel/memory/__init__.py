"""Memory management policies and stores the host applies to its VMs' p2ms: page sharing, swap
victims, host memory states, allocation targets, the compression cache."""
