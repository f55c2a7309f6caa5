"""The audit trail: one hash-chained record per decision; stores, verify, query. No settings."""
