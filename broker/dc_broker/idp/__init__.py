"""The identity provider: OIDC messages, pure (``oidc``), and the one transport that sends them (``transport``)."""
