"""Integration tests against a real third-party OAuth2 server (Django OAuth Toolkit) in a subprocess."""
