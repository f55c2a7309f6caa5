"""Who is asking: OIDC login, sessions, bearer tokens. Must not import gateway.settings."""
