"""Which proxy carries a request to the IdP: the profile's setting, then the variables as curl reads
them, loopback never through the environment's proxy. (Pure: dc_broker.idp.proxies, no network.)"""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

import pytest

from dc_broker.config import Profile
from dc_broker.errors import ConfigError
from dc_broker.idp.proxies import (
    DIRECT,
    EnvProxies,
    basic_credentials,
    credential_forms,
    redacted,
    route,
    scrub,
    setting_problem,
    shown,
)

IDP = "https://sso.corp.example/realms/acme/protocol/openid-connect/token"
CORP = "http://proxy.corp.example:3128"


def env(**variables: str) -> EnvProxies:
    return EnvProxies.from_environ(variables)


@pytest.mark.parametrize(
    ("url", "variables", "expected"),
    [
        (IDP, {}, None),
        (IDP, {"https_proxy": CORP}, CORP),
        (IDP, {"HTTPS_PROXY": CORP}, CORP),
        (IDP, {"https_proxy": CORP, "HTTPS_PROXY": "http://other:1"}, CORP),  # lower case wins
        (IDP, {"http_proxy": CORP, "HTTP_PROXY": CORP}, None),  # never read: plain http is loopback only
        (IDP, {"all_proxy": CORP}, CORP),
        (IDP, {"ALL_PROXY": CORP, "https_proxy": "http://first:1"}, "http://first:1"),
        (IDP, {"https_proxy": "proxy.corp.example:3128"}, CORP),  # no scheme: http://, as curl
        ("http://localhost:8080/t", {"all_proxy": CORP}, None),  # loopback stays local
        ("http://127.0.0.9:8080/t", {"https_proxy": CORP, "all_proxy": CORP}, None),
        ("https://[::1]:8443/t", {"https_proxy": CORP}, None),
        ("https://idp.localhost/t", {"https_proxy": CORP}, None),
        ("https://10.1.2.3/t", {"https_proxy": CORP}, CORP),
    ],
)
def test_the_environment_decides_when_the_profile_does_not(url: str, variables: dict[str, str], expected: str) -> None:
    assert route(url, None, env(**variables)) == expected


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("corp.example", True),
        (".corp.example", True),
        ("*.corp.example", True),
        ("sso.corp.example", True),
        ("SSO.Corp.Example", True),
        ("orp.example", False),  # a suffix of a label is not a domain
        ("other.example, corp.example", True),
        ("*", True),
        ("sso.corp.example:443", True),
        ("sso.corp.example:8443", False),
        ("", False),
        (" , ", False),
    ],
)
def test_no_proxy_entries(no_proxy: str, bypassed: bool) -> None:
    proxies = env(https_proxy=CORP, no_proxy=no_proxy)
    assert route(IDP, None, proxies) == (None if bypassed else CORP)
    assert route(IDP, None, env(https_proxy=CORP, NO_PROXY=no_proxy)) == route(IDP, None, proxies)


@pytest.mark.parametrize(
    ("url", "no_proxy", "bypassed"),
    [
        ("https://10.1.2.3/t", "10.0.0.0/8", True),
        ("https://10.1.2.3/t", "10.1.2.3", True),
        ("https://10.1.2.3/t", "192.168.0.0/16", False),
        ("https://[2001:db8::5]/t", "2001:db8::/32", True),
        ("https://[2001:db8::5]:8443/t", "[2001:db8::5]:8443", True),
        ("https://[2001:db8::5]/t", "[2001:db8::5]:8443", False),
        ("https://sso.corp.example/t", "10.0.0.0/8", False),  # a name never matches an address
        ("https://10.1.2.3/t", "corp.example", False),
    ],
)
def test_no_proxy_addresses_and_ranges(url: str, no_proxy: str, bypassed: bool) -> None:
    assert route(url, None, env(https_proxy=CORP, no_proxy=no_proxy)) == (None if bypassed else CORP)


def test_the_profile_s_setting_wins_over_everything() -> None:
    everything = env(https_proxy="http://env:1", no_proxy="*")
    assert route(IDP, CORP, everything) == CORP
    assert route("http://127.0.0.1:8080/t", CORP, everything) == CORP  # explicit: even loopback
    assert route(IDP, DIRECT, env(https_proxy=CORP)) is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("https_proxy", "socks5://proxy:1080", "is a socks5 proxy; only http:// and https:// proxies are supported"),
        ("HTTPS_PROXY", "ftp://proxy:21", "is not an http:// or https:// proxy URL"),
        ("all_proxy", "http://proxy:99999", "is not a URL with a valid port"),
        ("ALL_PROXY", "http://proxy:3128/path", "has a path"),
        ("https_proxy", "http://:3128", "names no host"),
    ],
)
def test_an_unusable_variable_is_a_config_error_naming_it(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        env(**{variable: value})
    assert f"the environment's {variable} {message}" in str(caught.value)
    assert "'direct'" in str(caught.value)  # what to do instead


def test_credentials_in_a_variable_are_used_and_never_shown() -> None:
    proxies = env(https_proxy="http://alice:s3cr%40t@proxy.corp.example:3128")
    assert route(IDP, None, proxies) == "http://alice:s3cr%40t@proxy.corp.example:3128"
    assert "s3cr" not in repr(proxies) and "alice" not in repr(proxies)
    assert shown("http://alice:s3cr%40t@proxy.corp.example:3128") == CORP
    with pytest.raises(ConfigError) as caught:
        env(https_proxy="socks5://alice:s3cret@proxy:1080")
    assert "s3cret" not in str(caught.value) and "socks5://***@proxy:1080" in str(caught.value)


@pytest.mark.parametrize(
    ("proxy", "text"),
    [
        ("http://proxy", "http://proxy:80"),
        ("https://proxy.corp.example", "https://proxy.corp.example:443"),
        ("http://[2001:db8::1]:3128", "http://[2001:db8::1]:3128"),
    ],
)
def test_shown_names_scheme_host_and_port(proxy: str, text: str) -> None:
    assert shown(proxy) == text


def test_scrub_takes_a_proxy_s_credentials_out_of_a_message_raw_or_decoded() -> None:
    proxy = "http://alice:s3cr%40t@proxy.corp.example:3128"
    assert scrub("refused alice with s3cr@t and s3cr%40t", proxy) == "refused *** with *** and ***"
    assert scrub("nothing to hide", None) == "nothing to hide"


def test_scrub_takes_every_encoding_of_the_credentials_out() -> None:
    """Userinfo as written, percent-decoded and encoded again, and the Basic base64 of user:password
    that Proxy-Authorization carries (httpx decodes the URL first), in both base64 alphabets, padded
    or not: a proxy quoting any of them back leaves no credential in the message."""
    proxy = "http://px%40user:p%3Ass+w%2Frd@proxy.corp.example:3128"
    user, password = "px@user", "p:ss+w/rd"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    quoted = [
        f"Basic {basic}",
        basic.rstrip("="),
        base64.urlsafe_b64encode(f"{user}:{password}".encode()).decode(),
        base64.b64encode(b"px%40user:p%3Ass+w%2Frd").decode(),
        "px%40user",
        "p%3Ass%2Bw%2Frd",
        "p%3Ass+w%2Frd",
        "p:ss+w/rd",
        quote_plus(password),
        user,
    ]
    for text in quoted:
        out = scrub(f"407 you sent {text} (bad)", proxy)
        assert out.startswith("407 you sent ") and out.endswith(" (bad)"), out
        for piece in ("px", "p:ss", "p%3A", basic[:8], basic.rstrip("=")[-8:]):
            assert piece not in out.removeprefix("407 you sent "), (text, out)
    assert credential_forms("http://proxy.corp.example:3128") == ()
    # what dc-broker proxy itself sends is one of the forms scrubbed
    assert basic_credentials(proxy) == f"Basic {basic}".encode()
    assert basic in credential_forms(proxy)
    assert basic_credentials("http://proxy.corp.example:3128") is None


def test_redacted_keeps_a_value_without_credentials() -> None:
    assert redacted("proxy:3128") == "proxy:3128"
    assert redacted("http://u:p@h:1") == "http://***@h:1"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (DIRECT, None),
        (CORP, None),
        ("https://proxy.corp.example", None),
        ("proxy.corp.example:3128", "is not an http:// or https:// proxy URL"),
        ("none", "is not an http:// or https:// proxy URL"),
        ("http://bob:pw@proxy:3128", "carries credentials, and config.toml holds no secrets"),
    ],
)
def test_a_profile_s_proxy_setting(value: str, problem: str | None) -> None:
    found = setting_problem(value)
    assert found == problem if problem is None else (found is not None and found.startswith(problem))


def test_a_profile_refuses_a_proxy_with_credentials_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as caught:
        Profile(name="acme", client_id="c", token_url=IDP, grant="client_credentials", proxy="http://bob:pw@proxy:3128")
    text = str(caught.value)
    assert "profile 'acme': proxy 'http://***@proxy:3128' carries credentials" in text
    assert "pw" not in text.replace("proxy", "")
    assert Profile(name="acme", client_id="c", token_url=IDP, grant="client_credentials", proxy=DIRECT).proxy == DIRECT
