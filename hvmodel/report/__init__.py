"""What runs are reported as: esxtop's view, the cost model, milestones, plots, the mapping figure.

Everything here reads hosts, VMs and their counters after (or between) slices and turns
them into text, numbers or pictures; nothing here changes guest state.
"""
