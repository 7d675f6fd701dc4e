"""Redis URLs are judged by the library (api.connection): InvalidArgumentError, never a
bare ValueError or RedisError from redis-py, kombu or Celery."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api import VirtualServer, errors
from api.connection import parse_redis_url, redact_url
from api.settings import Settings

BAD_URLS = [
    "http://x", "x", "redis://", "redis://h:99999/0", "redis://h/notanumber",
    "rediss://h/0?ssl_cert_reqs=bogus", "redis://h/0?ssl_cert_reqs=required",
    "rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", "rediss://h/0?ssl_verify=yes",
    "redis://h/0?socket_timeout=soon", "redis://h /0", "redis://\ud800/0",
    "redis://:change-me-redis-password@h/0",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_url_is_an_invalid_argument(url: str) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        parse_redis_url(url)
    with pytest.raises(errors.InvalidArgumentError):
        VirtualServer(url)
    with pytest.raises(errors.InvalidArgumentError):
        Settings.from_env({"VMTASK_REDIS_URL": url})


@pytest.mark.parametrize("spelling, mode", [
    ("CERT_REQUIRED", ssl.CERT_REQUIRED), ("required", ssl.CERT_REQUIRED),
    ("CERT_OPTIONAL", ssl.CERT_OPTIONAL), ("none", ssl.CERT_NONE), ("CERT_NONE", ssl.CERT_NONE),
])
def test_cert_reqs_in_both_spellings(spelling: str, mode: ssl.VerifyMode) -> None:
    endpoint = parse_redis_url(f"rediss://h:6380/0?ssl_cert_reqs={spelling}")
    assert endpoint.tls == {"ssl_cert_reqs": mode}
    assert "ssl_" not in endpoint.url
    VirtualServer(f"rediss://h:6380/0?ssl_cert_reqs={spelling}").close()


def test_plain_rediss_verifies_the_server_by_default() -> None:
    endpoint = parse_redis_url("rediss://h:6380/0")
    assert endpoint.celery_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert parse_redis_url("redis://h:6379/0").celery_ssl() is None


def test_tls_files_come_from_variables_and_must_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {"VMTASK_REDIS_URL": "rediss://h/0", "VMTASK_REDIS_CA": str(ca)}
    assert Settings.from_env(env).endpoint.tls == {
        "ssl_ca_certs": str(ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    with pytest.raises(errors.InvalidArgumentError, match="readable"):
        Settings.from_env({**env, "VMTASK_REDIS_CA": str(tmp_path / "missing.pem")})
    with pytest.raises(errors.InvalidArgumentError, match="rediss"):
        Settings.from_env({**env, "VMTASK_REDIS_URL": "redis://h/0"})
    with pytest.raises(errors.InvalidArgumentError, match="certificate"):
        Settings.from_env({**env, "VMTASK_REDIS_KEY": str(ca)})


def test_the_password_file_and_its_placeholder(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret/with:odd@chars\n")
    env = {"VMTASK_REDIS_URL": "redis://worker@h:6379/0",
           "VMTASK_REDIS_PASSWORD_FILE": str(secret)}
    endpoint = Settings.from_env(env).endpoint
    assert endpoint.url == "redis://worker:s3cret%2Fwith%3Aodd%40chars@h:6379/0"
    assert "s3cret" not in endpoint.redacted
    client = endpoint.client(1.0)
    assert client.connection_pool.connection_kwargs["password"] == "s3cret/with:odd@chars"
    assert client.connection_pool.connection_kwargs["username"] == "worker"
    secret.write_text("change-me-redis-password\n")
    with pytest.raises(errors.InvalidArgumentError, match="placeholder"):
        Settings.from_env(env)
    with pytest.raises(errors.InvalidArgumentError, match="cannot read"):
        Settings.from_env({**env, "VMTASK_REDIS_PASSWORD_FILE": str(tmp_path / "none")})
    secret.write_text("real")
    with pytest.raises(errors.InvalidArgumentError, match="twice"):
        Settings.from_env({**env, "VMTASK_REDIS_URL": "redis://:other@h/0"})


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda scheme, rest: f"{scheme}://{rest}",
              st.sampled_from(["redis", "rediss", "unix", "http", "REDIS"]), st.text(max_size=50)),
))
def test_any_text_is_a_url_or_an_invalid_argument(url: str) -> None:
    try:
        endpoint = parse_redis_url(url)
    except errors.InvalidArgumentError:
        return
    endpoint.client(0.1).connection_pool.get_encoder()  # redis-py accepts what we accepted


SENTINEL = "sentinel://:p%40ss@s1:26379/2;sentinel://s2;sentinel://[::1]:26380"


def test_a_sentinel_url_names_the_sentinels_master_and_primary_credentials() -> None:
    endpoint = parse_redis_url(SENTINEL, master="vmtask")
    target = endpoint.sentinel
    assert target is not None
    assert target.sentinels == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (target.master, target.db, target.password) == ("vmtask", 2, "p@ss")
    assert endpoint.wait_replicas == 1
    # kombu reads the password and database from whichever entry it uses.
    assert endpoint.url.split(";") == ["sentinel://:p%40ss@s1:26379/2",
                                       "sentinel://:p%40ss@s2:26379/2",
                                       "sentinel://:p%40ss@[::1]:26380/2"]
    assert "p%40ss" not in endpoint.redacted and "***" in endpoint.redacted
    options = endpoint.celery_transport_options(3.0)
    assert options["master_name"] == "vmtask" and options["socket_timeout"] == 3.0
    assert parse_redis_url("sentinel://s1/0?master_name=m").sentinel.master == "m"  # type: ignore[union-attr]


@pytest.mark.parametrize(("url", "master"), [
    ("sentinel://s1:26379", None),                            # no master name
    ("sentinel://s1/0?master_name=a", "b"),                   # named twice, differently
    ("sentinel://s1;sentinel://:pw@s2", "m"),                 # credentials on a later entry
    ("sentinel://s1;redis://s2", "m"),                        # a non-sentinel entry
    ("sentinel://s1/x", "m"),                                 # database not a number
    ("sentinel://s1/0?foo=1", "m"),                           # unknown parameter
    ("sentinel://:change-me@s1", "m"),                        # placeholder password
    ("sentinel://s1", "bad name!"),                           # invalid master name
    ("redis://h:6379/0", "m"),                                # a master without Sentinel
])
def test_bad_sentinel_urls_are_refused(url: str, master: str | None) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        parse_redis_url(url, master=master)


def test_sentinel_settings_come_from_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = Settings.from_env({
        "VMTASK_REDIS_URL": "sentinel://s1;sentinel://s2",
        "VMTASK_REDIS_SENTINEL_MASTER": "vmtask", "VMTASK_REDIS_PASSWORD_FILE": str(secret),
        "VMTASK_REDIS_WAIT_REPLICAS": "2", "VMTASK_REDIS_WAIT_MS": "250"})
    endpoint = settings.endpoint
    assert endpoint.sentinel is not None and endpoint.sentinel.password == "s3cret"
    assert (endpoint.wait_replicas, endpoint.wait_ms) == (2, 250)
    with pytest.raises(errors.InvalidArgumentError, match="TLS"):
        Settings.from_env({"VMTASK_REDIS_URL": "sentinel://s1?master_name=m",
                           "VMTASK_REDIS_CA": str(secret)})


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?password=pw-Query1",
    "redis://worker:pw-Query1@127.0.0.1:6379/0?password=pw-Query1&db=0",
    "sentinel://s1:26379?password=pw-Query1;sentinel://s2:26379",
])
def test_redact_url_hides_a_password_given_in_the_query(url: str) -> None:
    # redis-py logs in with ?password=, so every log and error message must hide it too.
    shown = redact_url(url)
    assert "pw-Query1" not in shown
    assert "password=***" in shown
