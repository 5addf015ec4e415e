"""Transport security, for real: PostgreSQL TLS against a private server with a certificate for
`localhost` made here, a second server without TLS, and Kafka TLS against the plaintext broker.

The DSN's sslmode is honoured by every connection the service makes (migrate, the store pool,
the API pool) and never downgraded; a TLS failure stops start-up with a ConfigError instead of
being retried for ever; secrets read from files never reach the output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from consumer.errors import ConfigError, is_misconfiguration, is_transient
from consumer.kafka import ensure_topics, security_kwargs
from consumer.migrate import migrate
from consumer.service import Role, Service
from consumer.settings import Settings
from devtools.factories import meter, vehicle
from devtools.stack import (
    LocalPostgres,
    free_port,
    settings_env,
    start_local_postgres,
    with_database,
)
from tests.conftest import make_settings, wait_until
from tests.integration.helpers import publish_readings
from tests.pki import EC_KEY, make_ca, openssl

DSN_PASSWORD = "dsn-pass-4e0b"  # noqa: S105 -- a test credential (trust auth ignores it)
SASL_PASSWORD = "sasl-pass-c81d"  # noqa: S105 -- a test credential


def _make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    """A certificate for DNS:localhost only (not 127.0.0.1), signed by `ca`."""
    openssl(d, "req", "-new", *EC_KEY, "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=fleet-test-server")  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    openssl(d, "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-set_serial", "1", "-days", "2", "-extfile", "server.ext",
            "-out", "server.crt")  # fmt: skip
    key = d / "server.key"
    key.chmod(0o600)  # PostgreSQL refuses a key others can read
    if os.geteuid() == 0:  # the server runs as `postgres`, and must own its key
        shutil.chown(key, "postgres")
    return d / "server.crt", key


@dataclass(frozen=True)
class Servers:
    tls: LocalPostgres  # ssl=on, certificate for localhost by `ca`; plaintext also allowed
    plain: LocalPostgres  # ssl=off
    ca: Path
    other_ca: Path  # trusted by nobody here

    def dsn(
        self,
        *,
        host: str = "localhost",
        sslmode: str = "verify-full",
        rootcert: Path | None = None,
        database: str = "postgres",
        server: LocalPostgres | None = None,
        password: str = "",
    ) -> str:
        port = (server or self.tls).port
        login = f"postgres:{password}" if password else "postgres"
        query = f"sslmode={sslmode}&sslrootcert={rootcert or self.ca}"
        return f"postgresql://{login}@{host}:{port}/{database}?{query}"

    def connections_since(self, offset: int) -> list[str]:
        """The server's 'connection authorized' log lines written after `offset`."""
        with self.tls.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if "connection authorized" in line]

    def log_offset(self) -> int:
        return self.tls.log_path.stat().st_size


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # Not tmp_path: pytest keeps it 0700, and as root the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="fleet-tls-"))
    root.chmod(0o755)
    pki = root / "pki"
    pki.mkdir(mode=0o755)
    ca = make_ca(pki, "fleet-test-ca")
    other_ca = make_ca(pki, "other-ca")
    cert, key = _make_server_cert(pki, "fleet-test-ca")
    started: list[LocalPostgres] = []
    try:
        tls = start_local_postgres(
            root,
            {
                "ssl": "on",
                "ssl_cert_file": f"'{cert}'",
                "ssl_key_file": f"'{key}'",
                "log_connections": "on",
            },
        )
        started.append(tls)
        plain = start_local_postgres(root, {"ssl": "off"})
        started.append(plain)
        yield Servers(tls, plain, ca, other_ca)
    finally:
        for server in started:
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _ssl_of_own_session(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


async def test_verify_full_connects_over_tls(servers: Servers) -> None:
    """sslmode=verify-full with the CA and host=localhost connects, and the session is encrypted."""
    conn = await asyncpg.connect(servers.dsn())
    try:
        assert await _ssl_of_own_session(conn)
        version = await conn.fetchval(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert version.startswith("TLSv1.")
    finally:
        await conn.close()


async def test_the_service_migrates_ingests_and_serves_over_verified_tls(
    servers: Servers, broker: str
) -> None:
    """migrate, the store pool and the API pool all honour verify-full: rows land, every session is TLS."""
    mark = servers.log_offset()
    database = f"fleet_tls_{uuid.uuid4().hex[:8]}"
    dsn = servers.dsn(database=database)
    assert await migrate(dsn)  # creates the database first: an admin connection, over TLS too
    s = make_settings(broker, dsn, api_database_url=SecretStr(dsn))
    await ensure_topics(broker, [*s.topics, s.dlq_topic], partitions=1, settings=s)
    service = Service(s, Role.ALL)  # the consumer (store pool) and the API (its own pool)
    check = await asyncpg.connect(dsn)
    try:
        assert await service.start()
        assert service.pipeline is not None
        runner = asyncio.create_task(service.pipeline.run())
        await publish_readings(broker, s.mixed_topic, [meter("m-1", 0), vehicle("v-1", 0)])

        async def landed() -> bool:
            rows = await check.fetchval(
                "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
            )
            return rows == 2

        await wait_until(landed, timeout=30)
        sessions = await check.fetch(
            """SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
               WHERE a.datname = $1 AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()""",
            database,
        )
        consumer = [r for r in sessions if r["application_name"].startswith("fleet-consumer")]
        others = [r for r in sessions if not r["application_name"].startswith("fleet-consumer")]
        assert consumer, "the store pool has sessions"
        assert others, "the API pool has a session"
        assert all(r["ssl"] for r in sessions), sessions
        service.pipeline.stop()
        await runner
    finally:
        await service.stop()
        await check.close()
    authorized = servers.connections_since(mark)
    assert len(authorized) >= 5  # migrate's two, store, API, this test's check
    assert all("SSL enabled" in line for line in authorized), authorized


async def test_verify_full_refuses_a_host_name_the_certificate_does_not_carry(
    servers: Servers,
) -> None:
    """The certificate is for localhost; reaching the same server as 127.0.0.1 fails on the name."""
    with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.1") as raised:
        await asyncpg.connect(servers.dsn(host="127.0.0.1"))
    assert "mismatch" in str(raised.value)


async def test_verify_full_refuses_a_certificate_from_another_ca(servers: Servers) -> None:
    """A server certificate not signed by the CA in sslrootcert fails verification."""
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncpg.connect(servers.dsn(rootcert=servers.other_ca))


async def test_verify_ca_checks_the_chain_but_not_the_name(servers: Servers) -> None:
    """verify-ca accepts the right CA under another name, and still refuses a foreign CA."""
    conn = await asyncpg.connect(servers.dsn(host="127.0.0.1", sslmode="verify-ca"))
    try:
        assert await _ssl_of_own_session(conn)
    finally:
        await conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(servers.dsn(sslmode="verify-ca", rootcert=servers.other_ca))


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
async def test_a_server_without_tls_is_refused_not_downgraded(
    servers: Servers, sslmode: str
) -> None:
    """Against a server without TLS, a mode that requires it fails; only prefer falls back."""
    plain_dsn = servers.dsn(server=servers.plain, sslmode=sslmode)
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        await asyncpg.connect(plain_dsn)
    # The server itself takes plaintext: the refusal above is the mode's doing.
    conn = await asyncpg.connect(servers.dsn(server=servers.plain, sslmode="prefer"))
    try:
        assert not await _ssl_of_own_session(conn)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("name mismatch", "CERTIFICATE_VERIFY_FAILED"),
        ("server without TLS", "rejected SSL upgrade"),
        ("missing CA file", "FileNotFoundError"),
    ],
)
async def test_the_service_stops_on_a_tls_failure_instead_of_retrying(
    servers: Servers, case: str, expected: str
) -> None:
    """A TLS failure at start-up is a ConfigError within seconds, with the cause and no password."""
    dsn = {
        "name mismatch": servers.dsn(host="127.0.0.1", password=DSN_PASSWORD),
        "server without TLS": servers.dsn(server=servers.plain, password=DSN_PASSWORD),
        "missing CA file": servers.dsn(rootcert=Path("/nonexistent/ca.pem"), password=DSN_PASSWORD),
    }[case]
    s = Settings(
        database_url=SecretStr(dsn), http_host="127.0.0.1", http_port=free_port(), log_json=True
    )
    service = Service(s, Role.INGEST)
    try:
        with pytest.raises(ConfigError, match=expected) as raised:
            await asyncio.wait_for(service.start(), timeout=15)
    finally:
        await service.stop()
    assert "cannot connect to the database" in str(raised.value)
    assert DSN_PASSWORD not in str(raised.value)


@pytest.mark.parametrize("command", [["run", "--role", "ingest"], ["migrate"]])
async def test_run_exits_with_a_configuration_error_on_an_untrusted_certificate(
    servers: Servers, command: list[str]
) -> None:
    """`python -m consumer run` (or `migrate`) with an unverifiable TLS DSN logs
    configuration_error and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "PG"))} | {
        "FLEET_DATABASE_URL": servers.dsn(rootcert=servers.other_ca, password=DSN_PASSWORD),
        "FLEET_HTTP_HOST": "127.0.0.1",
        "FLEET_HTTP_PORT": str(free_port()),
        "FLEET_LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *command,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode(errors="replace")
    assert process.returncode == 2, text
    assert "configuration_error" in text
    assert "CERTIFICATE_VERIFY_FAILED" in text
    assert '"dependency": "database"' not in text  # no retrying first
    assert DSN_PASSWORD not in text


async def test_secrets_from_files_work_and_never_reach_the_output(
    database: str, broker: str, tmp_path: Path
) -> None:
    """DSN and SASL password from FLEET_SECRETS_DIR are used, and appear nowhere in the process output."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    host_part = database.split("@", 1)[1]
    (secrets / "FLEET_DATABASE_URL").write_text(
        f"postgresql://postgres:{DSN_PASSWORD}@{host_part}\n"
    )
    (secrets / "FLEET_KAFKA_SASL_PASSWORD").write_text(SASL_PASSWORD + "\n")
    s = Settings(
        kafka_bootstrap_servers=broker,
        database_url=SecretStr(database),
        kafka_idempotent_producer=False,
        http_host="127.0.0.1",
        http_port=free_port(),
        log_json=True,
    )
    env = settings_env(s)
    del env["FLEET_DATABASE_URL"]
    env |= {
        "FLEET_SECRETS_DIR": str(secrets),
        # tansu offers no SASL: start-up gets past the database, then waits for the broker.
        "FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "FLEET_KAFKA_SASL_MECHANISM": "PLAIN",
        "FLEET_KAFKA_SASL_USERNAME": "fleet-ingest",
        "FLEET_RETRY_INITIAL_SECONDS": "0.1",
    }
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumer", "run", "--role", "ingest",
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            async def waiting_for_broker() -> bool:
                return '"dependency": "broker"' in log.read_text(errors="replace")

            await wait_until(waiting_for_broker, timeout=60)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = log.read_text(errors="replace")
    assert "kafka_password_in_clear_text" in text  # the settings were read and used
    assert DSN_PASSWORD not in text
    assert SASL_PASSWORD not in text


async def test_kafka_tls_against_a_plaintext_broker_fails_instead_of_connecting(
    broker: str, tmp_path: Path
) -> None:
    """A client configured for SSL never talks plaintext to a broker without TLS: it cannot start."""
    d = tmp_path / "pki"
    d.mkdir()
    s = Settings(
        kafka_bootstrap_servers=broker,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=make_ca(d, "kafka-ca"),
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker, request_timeout_ms=2000, **security_kwargs(s)
    )
    try:
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
            await consumer.start()
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    ("error", "misconfigured"),
    [
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), True),
        (ssl.SSLError(1, "wrong version number"), True),
        (ConnectionError('PostgreSQL server at "h:5432" rejected SSL upgrade'), True),
        (FileNotFoundError(2, "No such file or directory"), True),
        (asyncpg.ClientConfigurationError("`sslmode` parameter must be one of: ..."), True),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), False),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (TimeoutError(), False),
    ],
)
def test_tls_misconfiguration_is_not_retried_but_outages_are(
    error: BaseException, misconfigured: bool
) -> None:
    """Verification failures and refused TLS are configuration errors; dropped connections stay transient."""
    assert is_misconfiguration(error) is misconfigured
    assert is_transient(error) is not misconfigured


def test_with_database_keeps_the_tls_parameters(servers: Servers) -> None:
    """Switching database on a DSN keeps its sslmode and sslrootcert (the query string)."""
    dsn = with_database(servers.dsn(), "other")
    assert dsn.endswith(f"/other?sslmode=verify-full&sslrootcert={servers.ca}")
