"""One virtual machine: its vCPU and fill hook, event delivery, the run loop and exits, hidden CPU
state, CPUID, the INVLPG intercept, its balloon and crash-report disassembly."""
