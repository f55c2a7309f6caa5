"""Demo-only servers behind `tabiji demo`: loopback only, never part of a production deployment."""
