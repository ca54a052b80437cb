"""dc-broker: the daemon side (trio server, sessions, OIDC flows, dev IdP). See docs/architecture.md."""
