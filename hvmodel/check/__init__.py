"""Checking the MMUs against independent references: lock-step runs against Unicorn's own MMU,
the access matrix against a permission oracle, generated page-table programs (``fuzz``)."""
