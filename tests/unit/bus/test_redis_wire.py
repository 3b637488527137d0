"""Redis URLs: what blink accepts, and how it writes one where logs and errors show it (never its password)."""

from __future__ import annotations

import pytest

from blink.bus.redis_wire import check_url, redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://alice:hunter2@cache.example:6380/1", "rediss://alice:***@cache.example:6380/1"),
        ("redis://alice@127.0.0.1", "redis://alice@127.0.0.1"),  # a user alone is no secret
        ("redis://:p%40ss@127.0.0.1", "redis://:***@127.0.0.1"),
        ("redis://:hunter2@127.0.0.1/0?password=hunter2", "redis://:***@127.0.0.1/0?password=***"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
        (
            "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&PassWord=hunter2",
            "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&PassWord=***",
        ),
        ("redis://:hunter2@[::1", "(a Redis URL that cannot be parsed)"),
    ],
)
def test_redact_keeps_the_password_out(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none",
        "rediss://:pw@cache.example/0?ssl_ca_certs=/etc/ca.pem",
        "REDISS://cache.example",
        "unix:///run/redis.sock",
    ],
)
def test_redis_rediss_and_unix_urls_are_accepted(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://:hunter2@127.0.0.1:6379", "redis://, rediss:// or unix://"),
        ("127.0.0.1:6379", "redis://, rediss:// or unix://"),
        ("redis://:hunter2@127.0.0.1:notaport/0", "port"),
        ("redis://:hunter2@127.0.0.1:6379/0?db=x", "db"),
        ("redis://:hunter2@[::1", "cannot be parsed"),
    ],
)
def test_a_bad_url_is_a_value_error_that_never_shows_the_password(url: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_url(url)
    assert why in str(caught.value) and "hunter2" not in str(caught.value)
