"""Entry point of the DOT server subprocess: migrate a fresh sqlite DB, seed it, serve it with hypercorn.

    python -m tests.integration.dot_idp.serve --db /tmp/x/db.sqlite3 --fd 3

``--fd`` is a listening TCP socket the parent bound on 127.0.0.1 (port 0) and passed down, so there is
no window in which another process could take the port. Prints ``ready`` once the DB is seeded;
hypercorn serves until SIGTERM/SIGINT and then exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def seed() -> None:
    """The user and the two confidential applications (DOT: one grant type per application)."""
    from django.contrib.auth import get_user_model
    from oauth2_provider.models import Application

    from tests.integration.dot_idp import (
        PASSWORD,
        PASSWORD_CLIENT_ID,
        PASSWORD_CLIENT_SECRET,
        SERVICE_CLIENT_ID,
        SERVICE_CLIENT_SECRET,
        USERNAME,
    )

    user = get_user_model().objects.create_user(USERNAME, password=PASSWORD)
    for client_id, secret, grant in (
        (PASSWORD_CLIENT_ID, PASSWORD_CLIENT_SECRET, Application.GRANT_PASSWORD),
        (SERVICE_CLIENT_ID, SERVICE_CLIENT_SECRET, Application.GRANT_CLIENT_CREDENTIALS),
    ):
        # DOT 3 hashes client_secret on save (hash_client_secret=True): pass the plain secret
        Application.objects.create(
            name=client_id,
            client_id=client_id,
            client_secret=secret,
            hash_client_secret=True,
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=grant,
            user=user,
            # DOT_IDP_OIDC=1 (OpenID Connect on): ID tokens signed RS256 with the settings' key
            algorithm=Application.RS256_ALGORITHM if os.environ.get("DOT_IDP_OIDC") == "1" else "",
        )


def fast_sqlite() -> None:
    """No fsync per token: a throwaway DB on a loaded CI disk must not add seconds to a 6 s token's
    round trip (the tests time refresh-ahead against DOT's answers in real time)."""
    from django.db.backends.signals import connection_created

    def pragmas(sender: object, connection: Any, **_: object) -> None:
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=OFF")

    connection_created.connect(pragmas, weak=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dot_idp.serve")
    parser.add_argument("--db", required=True, help="sqlite file to create (must not exist)")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the parent")
    args = parser.parse_args(argv)

    os.environ["DOT_IDP_DB"] = args.db
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.integration.dot_idp.settings"
    import django
    from django.core.management import call_command

    django.setup()
    fast_sqlite()
    call_command("migrate", verbosity=0, interactive=False)
    seed()

    from hypercorn.config import Config
    from hypercorn.run import run

    config = Config()
    config.application_path = "tests.integration.dot_idp.asgi:application"
    config.bind = [f"fd://{args.fd}"]
    config.workers = 0  # serve in this process: one pid to signal, nothing spawned behind our back
    config.accesslog = None
    config.errorlog = "-"
    print("ready", flush=True)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
