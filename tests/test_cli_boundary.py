"""The one error boundary of `dc-broker` (``dc_broker.cli.boundary``) and the table it shares with
`dc-token`: every error class has a documented exit status, both commands print the same hint and
exit with the same status for the same error, an error from inside a trio nursery is one line like
any other, a bug stays a traceback, and every command takes the shared options. Also the package's
shape: the job modules never import the group module, and starting `dc-broker` imports no trio."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import trio
from click.testing import CliRunner

import dc_broker.cli
import dc_token.cli
from dc_broker.cli import boundary, cli
from dc_token import errors
from dc_token.errors import EXIT_CODES, DcBrokerError, LoginRequired, hint_for

PACKAGE = Path(dc_broker.cli.__file__).parent


def _all_error_classes(root: type[DcBrokerError] = DcBrokerError) -> Iterator[type[DcBrokerError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _all_error_classes(sub)


def _make(cls: type[DcBrokerError], message: str) -> DcBrokerError:
    """An instance with this message, whatever the class's own constructor wants (an OAuth error's
    fields, a protocol reply): the boundary reads only its class, ``str()`` and ``hint``."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


#: the whole tree as far as it is imported here: the client's classes, and the broker's (config, vault)
ERROR_CLASSES = sorted(set(_all_error_classes()), key=lambda c: f"{c.__module__}.{c.__name__}")


def raising(exc: BaseException, *, in_nursery: bool = False) -> click.Group:
    """A group under the boundary with one command, `fail PROFILE`, that raises ``exc`` (or runs
    trio with a nursery whose child raises it, as `dc-broker run`, `dev` and `proxy` do)."""

    @click.group(cls=boundary.ErrorBoundary)
    def group() -> None:
        pass

    @group.command()
    @boundary.PROFILE
    def fail(profile: str) -> None:
        if not in_nursery:
            raise exc

        async def child() -> None:
            raise exc

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child)

        trio.run(main)

    return group


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_has_a_documented_exit_status(cls: type[DcBrokerError]) -> None:
    assert cls.exit_code in EXIT_CODES, f"{cls.__name__}.exit_code {cls.exit_code} is not in EXIT_CODES"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_dc_broker_and_dc_token_say_the_same_for_the_same_error(
    cls: type[DcBrokerError], capsys: pytest.CaptureFixture[str]
) -> None:
    exc = _make(cls, "the thing went wrong")
    hint = hint_for(exc, "acme")
    assert "PROFILE" not in hint
    if cls.hint:
        assert hint, f"{cls.__name__} has a hint, but none was given for profile acme"

    broker = CliRunner().invoke(raising(exc), ["fail", "acme"])
    assert broker.exit_code == cls.exit_code
    assert broker.output == f"Error: {exc}\n" + (f"  {hint}\n" if hint else "")

    assert dc_token.cli._fail(exc, "acme") == cls.exit_code
    assert capsys.readouterr().err == f"dc-token: {exc}" + (f"; {hint}" if hint else "") + "\n"


def test_a_message_that_says_what_to_do_gets_no_second_hint() -> None:
    exc = LoginRequired("profile acme has no login; run `dc-broker login acme`")
    result = CliRunner().invoke(raising(exc), ["fail", "acme"])
    assert (result.exit_code, result.output) == (5, f"Error: {exc}\n")


def test_an_error_from_inside_a_nursery_is_one_line_with_its_hint() -> None:
    result = CliRunner().invoke(raising(LoginRequired("no usable credential"), in_nursery=True), ["fail", "acme"])
    assert (result.exit_code, result.output) == (5, "Error: no usable credential\n  run `dc-broker login acme`\n")


def test_a_bug_from_inside_a_nursery_stays_a_traceback() -> None:
    result = CliRunner().invoke(raising(ValueError("a bug"), in_nursery=True), ["fail", "acme"])
    assert result.exit_code == 1 and "Error:" not in result.output
    assert isinstance(result.exception, BaseExceptionGroup)
    assert result.exception.subgroup(ValueError) is not None


def test_ctrl_c_exits_130(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["dc-broker", "fail", "acme"])
    with pytest.raises(SystemExit) as exited:
        boundary.main(raising(KeyboardInterrupt()), "dc-broker")
    assert exited.value.code == boundary.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "\nInterrupted.\n"  # click ends the ^C line; one line of ours, no blank one


def test_an_expected_error_through_main_exits_with_its_status(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["dc-broker", "fail", "acme"])
    with pytest.raises(SystemExit) as exited:
        boundary.main(raising(errors.Locked("the vault is locked")), "dc-broker")
    assert exited.value.code == 6
    assert capsys.readouterr().err == "Error: the vault is locked\n  run `dc-broker unlock`\n"


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield prefix + name, command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


SHARED = {
    "socket_path": ("--socket", "DC_BROKER_SOCKET"),
    "config_path": ("--config", "DC_BROKER_CONFIG"),
    "vault_path": ("--vault", "DC_BROKER_VAULT"),
}


def test_every_command_takes_the_shared_options(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[profiles.acme]\nserver = "https://idp.example"\ntenant = "t"\nclient_id = "c"\ngrant = "client_credentials"\n'
    )
    config.chmod(0o600)
    profiles = 0
    for name, command in _commands(cli):
        for param in command.params:
            if param.name in SHARED:
                assert isinstance(param, click.Option), name
                assert (param.opts, param.envvar) == ([SHARED[param.name][0]], SHARED[param.name][1]), name
            if param.name == "profile":
                profiles += 1
                ctx = click.Context(command)
                ctx.params["config_path"] = str(config)
                assert [item.value for item in param.shell_complete(ctx, "ac")] == ["acme"], name
                param.process_value(ctx, "acme")
                assert "acme" in ctx.meta.values(), f"{name}: PROFILE is not what its errors' hints name"
    assert profiles >= 8  # status login logout add set rotate remove proxy


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_job_modules_never_import_the_group_module() -> None:
    submodules = {f"dc_broker.cli.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        for name in _imports(path):
            if name.startswith("dc_broker.cli."):
                assert any(name == m or name.startswith(m + ".") for m in submodules), f"{path.name} imports {name}"


def test_starting_dc_broker_imports_neither_trio_nor_httpx_nor_the_daemon() -> None:
    heavy = ("trio", "httpx", "h11", "cryptography", "dc_broker.daemon", "dc_broker.vault", "dc_broker.proxy")
    code = f"import sys, dc_broker.cli; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_that_reads_or_holds_a_secret_protects_its_process_first(name: str, monkeypatch) -> None:
    """The commands that take a password, client secret or passphrase, open the vault's data key
    (init, add, rotate, login, unlock, passwd) or hold every request's bearer token (proxy) make their
    process undumpable before they run; the others do not need to (`run` and `dev` harden themselves)."""
    import dc_token.protect

    calls: list[str] = []
    monkeypatch.setattr(dc_token.protect, "no_dumps", lambda **kw: calls.append(name))
    with click.Context(cli) as ctx:
        cli.resolve_command(ctx, [name])
    holds = name in {"init", "add", "rotate", "login", "unlock", "passwd", "proxy"}
    assert calls == ([name] if holds else []), name
