"""The MMU modes (``nested``, ``shadow``, ``native``; ``modes``), their contract (``base``), the one
guest page walker (``walk``) and, below them, the p2m (``p2m``)."""
