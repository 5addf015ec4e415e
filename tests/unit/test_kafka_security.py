"""FLEET_KAFKA_* security settings -> aiokafka's client arguments; secrets from files, never shown."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError
from structlog.testing import capture_logs

from consumer.errors import ConfigError
from consumer.kafka import make_consumer, make_producer, security_kwargs
from consumer.settings import Settings
from tests.pki import EC_KEY, make_ca, openssl

PASSWORD = "sasl-pass-7f3a"  # noqa: S105 -- a test credential
KEY_PASSWORD = "key-pass-91c2"  # noqa: S105 -- a test credential


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (ca.crt) and a client certificate (client.crt) with a passphrase-protected key."""
    d = tmp_path_factory.mktemp("kafka-pki")
    make_ca(d, "ca")
    openssl(d, "req", "-new", *EC_KEY, "-keyout", "client.key", "-passout", f"pass:{KEY_PASSWORD}",
            "-out", "client.csr", "-subj", "/CN=fleet-consumer")  # fmt: skip
    openssl(d, "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", "2", "-days", "2", "-out", "client.crt")  # fmt: skip
    return d


def settings(**overrides: Any) -> Settings:
    return Settings(kafka_bootstrap_servers="broker.example:9093", **overrides)


def sasl(protocol: str = "SASL_SSL", mechanism: str = "SCRAM-SHA-512", **more: Any) -> Settings:
    return settings(
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="fleet-ingest",
        kafka_sasl_password=PASSWORD,
        **more,
    )


def test_plaintext_is_the_default_and_adds_nothing_else() -> None:
    """Without FLEET_KAFKA_SECURITY_PROTOCOL the clients connect in plaintext, as before."""
    assert security_kwargs(settings()) == {"security_protocol": "PLAINTEXT"}


def test_ssl_verifies_the_broker_certificate_and_name_against_the_ca(pki: Path) -> None:
    """SSL: a context that requires a certificate signed by the given CA, for the broker's name."""
    kwargs = security_kwargs(
        settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pki / "ca.crt")
    )
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    assert kwargs["security_protocol"] == "SSL"
    context: ssl.SSLContext = kwargs["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    subjects = [dict(field[0] for field in ca["subject"]) for ca in context.get_ca_certs()]
    assert {"commonName": "ca"} in subjects


def test_ssl_without_a_ca_file_trusts_the_system_store() -> None:
    """SSL without FLEET_KAFKA_SSL_CAFILE still verifies, against the system's CAs (cloud brokers)."""
    context: ssl.SSLContext = security_kwargs(settings(kafka_security_protocol="SSL"))[
        "ssl_context"
    ]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_logs_in_with_the_mechanism_over_tls(pki: Path, mechanism: str) -> None:
    """SASL_SSL: the mechanism, username and password go to aiokafka, over a verifying TLS context."""
    kwargs = security_kwargs(sasl("SASL_SSL", mechanism, kafka_ssl_cafile=pki / "ca.crt"))
    assert {k: v for k, v in kwargs.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "fleet-ingest",  # aiokafka's name, for SCRAM as well
        "sasl_plain_password": PASSWORD,
    }
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_with_scram_has_no_tls_and_no_warning(mechanism: str) -> None:
    """SASL_PLAINTEXT with SCRAM: no TLS context, and no warning (the password never crosses)."""
    with capture_logs() as logs:
        kwargs = security_kwargs(sasl("SASL_PLAINTEXT", mechanism))
    assert "ssl_context" not in kwargs
    assert kwargs["sasl_mechanism"] == mechanism
    assert logs == []


def test_plain_over_plaintext_is_warned_about_without_the_password() -> None:
    """SASL_PLAINTEXT with PLAIN works but warns that the password crosses the network in clear."""
    with capture_logs() as logs:
        security_kwargs(sasl("SASL_PLAINTEXT", "PLAIN"), "consumer")
    assert [(e["event"], e["log_level"], e["client"]) for e in logs] == [
        ("kafka_password_in_clear_text", "warning", "consumer")
    ]
    assert PASSWORD not in repr(logs)


def test_hostname_checking_can_be_turned_off_but_certificates_are_still_verified(
    pki: Path,
) -> None:
    """FLEET_KAFKA_SSL_CHECK_HOSTNAME=false skips the name only, and says so in the log."""
    with capture_logs() as logs:
        context = security_kwargs(
            settings(
                kafka_security_protocol="SSL",
                kafka_ssl_cafile=pki / "ca.crt",
                kafka_ssl_check_hostname=False,
            )
        )["ssl_context"]
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert [e["event"] for e in logs] == ["kafka_hostname_not_verified"]


def test_a_client_certificate_with_an_encrypted_key_loads_with_its_password(pki: Path) -> None:
    """Mutual TLS: the client certificate and its passphrase-protected key load."""
    kwargs = security_kwargs(
        settings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki / "ca.crt",
            kafka_ssl_certfile=pki / "client.crt",
            kafka_ssl_keyfile=pki / "client.key",
            kafka_ssl_key_password=KEY_PASSWORD,
        )
    )
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("key_password", [None, "wrong-key-pass"])
def test_an_encrypted_key_without_its_password_is_a_config_error(
    pki: Path, key_password: str | None
) -> None:
    """A missing or wrong key passphrase is a ConfigError naming the settings, never a prompt."""
    s = settings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=pki / "client.crt",
        kafka_ssl_keyfile=pki / "client.key",
        kafka_ssl_key_password=key_password,
    )
    with pytest.raises(ConfigError, match="FLEET_KAFKA_SSL_") as raised:
        security_kwargs(s)
    assert "wrong-key-pass" not in str(raised.value)


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    """A CA file that does not parse is a ConfigError when the client is built."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="FLEET_KAFKA_SSL_"):
        security_kwargs(settings(kafka_security_protocol="SSL", kafka_ssl_cafile=bogus))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "SASL_SSL needs FLEET_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_password": PASSWORD},
            "SASL_PLAINTEXT needs FLEET_KAFKA_SASL_USERNAME",
        ),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_username": "u",
                "kafka_sasl_password": "",
            },
            "needs FLEET_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_sasl_username": "u", "kafka_sasl_password": PASSWORD},
            "PLAINTEXT does not log in",
        ),
        ({"kafka_ssl_cafile": "ca.crt"}, "FLEET_KAFKA_SSL_CAFILE set, but"),
        ({"kafka_ssl_check_hostname": False}, "does not use TLS"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "client.key"},
            "set FLEET_KAFKA_SSL_CERTFILE",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "missing.pem"},
            "kafka_ssl_cafile",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"},
            "kafka_sasl_mechanism",
        ),
    ],
)
def test_misconfigurations_are_refused_with_a_clear_message(
    pki: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any], message: str
) -> None:
    """Incomplete or contradictory settings fail when read, saying which, never quoting secrets."""
    monkeypatch.chdir(pki)  # relative file names resolve against the PKI directory
    with pytest.raises(ValidationError, match=message) as raised:
        settings(**overrides)
    assert PASSWORD not in str(raised.value)


def test_secrets_come_from_files_in_the_secrets_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files named like the variables in FLEET_SECRETS_DIR supply secrets (case-insensitive, trimmed)."""
    (tmp_path / "FLEET_KAFKA_SASL_PASSWORD").write_text(PASSWORD + "\n")
    (tmp_path / "fleet_database_url").write_text("postgresql://fleet:db-pass-55e1@db/fleet\n")
    monkeypatch.setenv("FLEET_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLEET_KAFKA_SASL_USERNAME", "fleet-ingest")
    s = Settings()
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == PASSWORD
    assert s.database_url.get_secret_value() == "postgresql://fleet:db-pass-55e1@db/fleet"
    assert security_kwargs(s)["sasl_plain_password"] == PASSWORD
    for shown in (repr(s), str(s), repr(s.model_dump())):
        assert PASSWORD not in shown
        assert "db-pass-55e1" not in shown


def test_an_environment_variable_wins_over_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set both ways, the environment variable is the one used."""
    (tmp_path / "FLEET_KAFKA_SASL_PASSWORD").write_text("from-file")
    monkeypatch.setenv("FLEET_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_KAFKA_SASL_PASSWORD", "from-env")
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == "from-env"


def test_a_secrets_dir_that_does_not_exist_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped FLEET_SECRETS_DIR fails loudly rather than silently falling back to defaults."""
    monkeypatch.setenv("FLEET_SECRETS_DIR", str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match="FLEET_SECRETS_DIR"):
        Settings()


async def test_every_client_factory_passes_the_security_settings_to_aiokafka(pki: Path) -> None:
    """The consumer and producer the service builds carry the protocol, mechanism and TLS context."""
    s = sasl("SASL_SSL", "SCRAM-SHA-256", kafka_ssl_cafile=pki / "ca.crt")
    consumer, producer = make_consumer(s), make_producer(s)
    try:
        # aiokafka keeps them on its cluster client, without public getters.
        for inner in (consumer._client, producer.client):
            assert inner._security_protocol == "SASL_SSL"
            assert inner._sasl_mechanism == "SCRAM-SHA-256"
            assert inner._sasl_plain_username == "fleet-ingest"
            assert isinstance(inner._ssl_context, ssl.SSLContext)
            assert inner._ssl_context.check_hostname is True
    finally:
        await consumer.stop()
        await producer.stop()


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"FLEET_BATCH_MAX_RECORDS": "0"}, "batch_max_records"),
        (
            {"FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FLEET_KAFKA_SASL_USERNAME": "ingest"},
            "FLEET_KAFKA_SASL_PASSWORD",
        ),
    ],
)
def test_run_with_invalid_settings_exits_2_with_the_reason_and_no_secret(
    setting: dict[str, str], named: str
) -> None:
    """A bad FLEET_ value stops `python -m consumer` with plain words, not a traceback."""
    env = {"PATH": "/usr/bin:/bin", "FLEET_DATABASE_URL": "postgresql://u:hunter2@db/x"} | setting
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "run"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("configuration error")
    assert named in done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
