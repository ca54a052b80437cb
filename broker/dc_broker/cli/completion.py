"""Shell completion for ``dc-broker`` and ``dc-token`` (bash, zsh, fish), profile names included.

``dc-broker completion SHELL`` prints one script that completes both commands:

* ``dc-broker``: click's own completion (``_DC_BROKER_COMPLETE=SHELL_source``); profile arguments
  complete from config.toml (``complete_profiles``).
* ``dc-token``: a small hand-written script (dc-token has no click); its profile names come from
  ``dc-token --complete-profiles``, which asks the running broker which profiles the caller may use,
  so it also works for a consumer of a shared broker that cannot read the config.

Owns no state and never talks to an IdP; a broken config completes nothing rather than erroring.
Every TAB starts ``dc-broker`` and imports this module: it imports click and the config only.
"""

from __future__ import annotations

from typing import Final

import click
from click.shell_completion import CompletionItem

from dc_broker.config import SETTABLE_KEYS
from dc_broker.config.load import default_config_path, load_config
from dc_token.errors import DcBrokerError

SHELLS: Final = ("bash", "zsh", "fish")

_DC_TOKEN_OPTIONS: Final = "--header --json --exec-credential --min-ttl --socket --help --version"
_DC_TOKEN: Final[dict[str, str]] = {
    "bash": f"""
_dc_token_complete() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}}
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "{_DC_TOKEN_OPTIONS}" -- "$cur"))
    elif [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "exec git-credential $(dc-token --complete-profiles 2>/dev/null)" -- "$cur"))
    elif [[ $COMP_CWORD -eq 2 && ${{COMP_WORDS[1]}} == exec ]]; then
        COMPREPLY=($(compgen -W "$(dc-token --complete-profiles 2>/dev/null)" -- "$cur"))
    fi
}}
complete -o default -F _dc_token_complete dc-token
""",
    "zsh": f"""
_dc_token_complete() {{
    if [[ $PREFIX == -* ]]; then
        compadd -- {_DC_TOKEN_OPTIONS}
    elif (( CURRENT == 2 )); then
        compadd -- exec git-credential ${{(f)"$(dc-token --complete-profiles 2>/dev/null)"}}
    elif [[ $CURRENT -eq 3 && ${{words[2]}} == exec ]]; then
        compadd -- ${{(f)"$(dc-token --complete-profiles 2>/dev/null)"}}
    else
        _files
    fi
}}
compdef _dc_token_complete dc-token
""",
    "fish": """
complete -c dc-token -f -n '__fish_is_nth_token 1' -a '(dc-token --complete-profiles 2>/dev/null) exec git-credential'
complete -c dc-token -f -n '__fish_seen_subcommand_from exec; and __fish_is_nth_token 2' \\
    -a '(dc-token --complete-profiles 2>/dev/null)'
complete -c dc-token -l header -l json -l exec-credential -l min-ttl -r -l socket -r -l version
""",
}


def complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Profile names from the config the command would read (``--config`` if already typed)."""
    path = ctx.params.get("config_path") or default_config_path()
    try:
        names = load_config(path, missing_ok=True).profiles
    except DcBrokerError:
        return []
    return [CompletionItem(name) for name in sorted(names) if name.startswith(incomplete)]


def complete_settings(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``dc-broker set acme <TAB>``: the keys a profile takes, as ``KEY=`` (each once per command line)."""
    typed = {a.partition("=")[0] for a in ctx.params.get(param.name or "", ()) or ()}
    return [
        CompletionItem(f"{key}=")
        for key in SETTABLE_KEYS
        if key not in typed and f"{key}=".startswith(incomplete.replace("-", "_"))
    ]


def script(cli: click.Command, shell: str) -> str:
    """The completion script for both commands in ``shell``: click's own for ``cli`` (what
    ``_DC_BROKER_COMPLETE=SHELL_source dc-broker`` prints), then dc-token's."""
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None  # SHELLS are the shells click supports
    source = completer(cli, {}, "dc-broker", "_DC_BROKER_COMPLETE").source()
    return f"# dc-broker and dc-token completion for {shell}\n{source}\n{_DC_TOKEN[shell]}"


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for dc-broker and dc-token (profile names included).

    \b
      bash: echo 'eval "$(dc-broker completion bash)"' >> ~/.bashrc
      zsh:  echo 'eval "$(dc-broker completion zsh)"' >> ~/.zshrc      (after compinit)
      fish: dc-broker completion fish > ~/.config/fish/completions/dc-broker.fish
    """
    click.echo(script(ctx.find_root().command, shell), nl=False)


#: what this module adds to the `dc-broker` group
COMMANDS = (completion,)
