"""The check of URLs that callers name (a judge's): refused where they would reach the server's own network,
and pinned to the address checked."""

import pytest
from pydantic import ValidationError

from core.outbound import Destination, RefusedURL, destination, host_and_port
from core.settings import Settings

PUBLIC_V4, PUBLIC_V6 = "93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


def resolving_to(*addresses: str):
    return lambda _host, _port: list(addresses)


def never_resolve(host: str, _port: int):
    raise AssertionError(f"{host} should be refused before it is resolved")


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "::1", "::", "fc00::1", "fe80::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",  # IPv4-mapped
    "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe",  # 6to4 and NAT64 forms of 169.254.169.254
])
def test_a_name_resolving_to_a_non_public_address_is_refused(address):
    """As the worker checks before it connects, whatever the API found when the evaluation was created."""
    with pytest.raises(RefusedURL, match="not a public address"):
        destination("http://judge.example/v1/chat/completions", [], resolve=resolving_to(address))


def test_every_address_of_a_name_is_checked():
    with pytest.raises(RefusedURL, match="10.0.0.1"):
        destination("https://judge.example/v1", [], resolve=resolving_to(PUBLIC_V4, "10.0.0.1"))


def test_the_connection_goes_to_the_checked_address_under_the_name_asked_for():
    assert destination("https://judge.example/v1/chat/completions", [], resolve=resolving_to(PUBLIC_V4)) == \
        Destination(f"https://{PUBLIC_V4}:443/v1/chat/completions", "judge.example", "judge.example")
    assert destination("http://judge.example:8080/v1", [], resolve=resolving_to(PUBLIC_V6)) == \
        Destination(f"http://[{PUBLIC_V6}]:8080/v1", "judge.example:8080", "judge.example")


@pytest.mark.parametrize("url", ["http://judge.example/v1?x=1", "http://judge.example/v1?", "http://judge.example/v1#a",
                                 "http://user:pw@judge.example/v1", "http://user@judge.example/v1", "ftp://x/v1",
                                 "http:///v1"])
def test_queries_fragments_user_info_and_other_schemes_are_refused_unresolved(url):
    with pytest.raises(RefusedURL):
        destination(url, ["judge.example"], resolve=never_resolve)


def test_allowed_hosts_skip_the_address_check_on_their_port():
    allowed = ["127.0.0.1:8000", "localhost", "[::1]:9000"]
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1234/v1", "https://localhost/v1", "http://[::1]:9000/v1"):
        assert destination(url, allowed, resolve=never_resolve).url == url
    for url in ("http://127.0.0.1:8001/v1", "http://[::1]:9001/v1", "http://127.0.0.2:8000/v1"):
        with pytest.raises(RefusedURL, match="not a public address"):
            destination(url, allowed)


def test_localhost_is_refused_through_the_system_resolver():
    with pytest.raises(RefusedURL, match="not a public address"):
        destination("http://localhost:8000/v1", [])


@pytest.mark.parametrize("entry", ["http://x", "x/y", "u@x", "x:port", ""])
def test_an_allowed_host_is_host_and_port_only(entry):
    with pytest.raises(ValueError):
        host_and_port(entry)
    with pytest.raises(ValidationError):
        Settings(judge_allowed_hosts=[entry])
