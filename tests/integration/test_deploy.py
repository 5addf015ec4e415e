"""The docker compose stack, checked without Docker: its files, its database roles, its dashboard.

No Docker engine runs here. What stands in for one:
- the compose files are validated against the Compose Specification's JSON schema
  (deploy/schema/) and loaded by a real Compose implementation (Debian's docker-compose
  1.29.2, `config`), then checked for what neither does (scaling, mounts, wiring);
- the postgres container's first-boot script runs against a private PostgreSQL, and the
  DSNs compose gives migrate, consumer and api are used as they are, host aside;
- the Grafana dashboard's expressions are matched against what the running service exports
  and evaluated by a real Prometheus configured like deploy/prometheus/prometheus.yml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from consumer.kafka import ensure_topics
from consumer.migrate import migrate
from consumer.service import Role, Service
from consumer.sessions import SessionWorker
from consumer.settings import Settings
from devtools.factories import encode, meter, mixed_fleet
from devtools.stack import drop_database, fresh_database, start_local_postgres
from tests.conftest import ARTIFACTS, ROOT, make_settings, wait_until
from tests.integration.helpers import offsets_reach, publish, publish_readings, running_service
from tests.integration.processes import running_prometheus

COMPOSE = ROOT / "docker-compose.yml"
THREE_BROKERS = ROOT / "deploy" / "compose.kafka-3-brokers.yml"
SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fleet.json"
POSTGRES_INIT = ROOT / "deploy" / "postgres" / "init"
SERVICE_PORT = 8080  # FLEET_HTTP_PORT's default, what the image serves on

# Prometheus makes this one itself for every target.
PROMETHEUS_SYNTHETIC = {"up"}
# What the dashboard's $__rate_interval stands for here (scrapes every second, a few
# seconds of traffic: the window must cover it all).
RATE_INTERVAL = "30s"


# --- reading the files ----------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{path} is not a mapping"
    return loaded


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, through a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["braced"] or m["named"], m["op"], m["arg"] or ""
        current = env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in {":?", "?"} and not current:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose_variables(text: str) -> dict[str, str]:
    """Every ${VAR...} a compose file reads, with its default ('' when it has none)."""
    return {m["braced"]: m["arg"] or "" for m in _VARIABLE.finditer(text) if m["braced"]}


def services(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The services of compose files (default: docker-compose.yml) merged like `docker compose
    -f a -f b` does (mappings key by key, other values replaced), interpolated with `env`
    (default: no variable set, so every default applies)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths or (COMPOSE,):
        for name, service in interpolate(load_yaml(path), env or {})["services"].items():
            into = merged.setdefault(name, {})
            for key, value in service.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    into[key] = into[key] | value
                else:
                    into[key] = value
    return merged


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return {k: v for k, _, v in (item.partition("=") for item in raw)}
    return {k: None if v is None else str(v) for k, v in raw.items()}


def bind_mounts(service: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount (short syntax) the service has."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


@dataclass(frozen=True)
class Target:
    panel: str
    expr: str


def dashboard_targets() -> list[Target]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        Target(panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


_STRING = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels aside)."""
    bare = _STRING.sub('""', expr)
    bare = _MATCHERS.sub("", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = _GROUPING.sub("", bare)
    return {
        m.group()
        for m in _IDENTIFIER.finditer(bare)
        if not bare[m.end() :].lstrip().startswith("(") and m.group().lower() not in _KEYWORDS
    }


def promql_labels(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    bare = _STRING.sub('""', expr)
    names = {
        name.strip()
        for matchers in _MATCHERS.findall(bare)
        for name in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)
    }
    return names | {
        label.strip() for group in _GROUPING.findall(bare) for label in group.split(",") if label
    }


def exported(exposition: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names the /metrics text declares (histogram suffixes included) and the label
    names each one's samples carry."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        if kind in {"histogram", "summary"}:
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", name}
        else:
            names.add(name)
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([\w:]+)(?:\{(.*)\})? ", exposition, re.MULTILINE):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', body))
    return names, labels


# --- the compose files ----------------------------------------------------------------------


def test_compose_files_validate_against_the_compose_spec_schema() -> None:
    """docker-compose.yml and the three-broker override are valid Compose files, by the
    specification's own schema (which refuses a misspelt key: the canary)."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    for path in (COMPOSE, THREE_BROKERS):
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(load_yaml(path))]
        assert errors == [], f"{path.name}: {errors}"
    canary = load_yaml(COMPOSE)
    canary["services"]["consumer"]["helthcheck"] = canary["services"]["consumer"]["healthcheck"]
    assert not validator.is_valid(canary)


def test_docker_compose_loads_the_stack_alone_with_the_simulator_and_with_three_brokers() -> None:
    """A real Compose implementation (`docker-compose config`) accepts every way of running
    the stack, without an unset-variable warning."""
    binary = compose_binary()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "COMPOSE_"))}
    ways: list[list[str | Path]] = [
        ["-f", COMPOSE],
        ["--profile", "sim", "-f", COMPOSE],
        ["-f", COMPOSE, "-f", THREE_BROKERS],
    ]
    for way in ways:
        done = subprocess.run(
            [binary, "--project-directory", ROOT, *way, "config"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "WARNING" not in done.stderr, done.stderr
        merged = yaml.safe_load(done.stdout)
        assert {"kafka", "postgres", "migrate", "consumer", "api"} <= set(merged["services"])
    assert {"kafka-2", "kafka-3"} <= set(merged["services"])  # the last one: three brokers
    voters = merged["services"]["kafka"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters == "1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"


def compose_binary() -> str:
    binary = os.environ.get("FLEET_TEST_DOCKER_COMPOSE") or shutil.which("docker-compose")
    if not binary:
        pytest.fail("needs Compose: apt-get install docker-compose (or FLEET_TEST_DOCKER_COMPOSE)")
    return binary


def kafka_init_calls(tmp_path: Path, settings: Mapping[str, str]) -> list[tuple[list[str], str]]:
    """Run kafka-init's script as Compose hands it to the container (with `settings` in .env),
    kafka-topics.sh replaced by a recorder: each call's arguments and its --command-config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "COMPOSE_"))}
    done = subprocess.run(
        [compose_binary(), "--project-directory", ROOT, "-f", COMPOSE, "config"],
        capture_output=True,
        text=True,
        env=env | dict(settings),
        timeout=60,
        check=True,
    )
    init = yaml.safe_load(done.stdout)["services"]["kafka-init"]
    assert init["entrypoint"] == ["/bin/bash", "-euc"]
    recorder = tmp_path / "kafka-topics.sh"
    calls = tmp_path / "calls.jsonl"
    recorder.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "config = open(args[args.index('--command-config') + 1]).read() "
        "if '--command-config' in args else ''\n"
        f"open({str(calls)!r}, 'a').write(json.dumps([args, config]) + '\\n')\n"
    )
    recorder.chmod(0o755)
    script = (
        init["command"][0]
        .replace("$$", "$")  # Compose's escape for a literal $
        .replace("/opt/kafka/bin/kafka-topics.sh", str(recorder))
        .replace("/tmp/client.properties", str(tmp_path / "client.properties"))  # noqa: S108 -- the container's path, replaced
    )
    variables = {k: v for k, v in init["environment"].items() if v is not None}
    subprocess.run(["/bin/bash", "-euc", script], env=env | variables, check=True, timeout=60)
    return [tuple(json.loads(line)) for line in calls.read_text().splitlines()]  # type: ignore[misc]


def test_kafka_init_logs_in_like_the_services_and_sets_an_explicit_retention(
    tmp_path: Path,
) -> None:
    """Against an external cluster with a SASL login (FLEET_KAFKA_* in .env), every
    kafka-topics.sh call of kafka-init carries that login, so the topics get created and the
    consumer and API (which wait for kafka-init) start; every topic gets retention.ms."""
    login = {
        "FLEET_KAFKA_BOOTSTRAP_SERVERS": "kafka-1.example:9093",
        "FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FLEET_KAFKA_SASL_USERNAME": "fleet-ingest",
        "FLEET_KAFKA_SASL_PASSWORD": "s3cret-pass",
    }
    calls = kafka_init_calls(tmp_path, login)
    assert len(calls) == 6  # five topics created (readings, dead letters, alerts), then described
    for args, config in calls:
        assert args[args.index("--bootstrap-server") + 1] == "kafka-1.example:9093"
        assert config.splitlines() == [
            "security.protocol=SASL_SSL",
            "sasl.mechanism=SCRAM-SHA-512",
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            'username="fleet-ingest" password="s3cret-pass";',
        ]
    for args, _ in calls[:4]:
        assert "--create" in args
        assert args[args.index("--config") + 1] == "retention.ms=604800000"

    (tmp_path / "plain").mkdir()
    plain = kafka_init_calls(tmp_path / "plain", {})  # the compose stack's own broker
    assert {config for _, config in plain} == {"security.protocol=PLAINTEXT\n"}


def test_every_dependency_exists_and_is_waited_for_until_it_is_ready() -> None:
    """`docker compose up` converges: each depends_on names a service and waits for it to be
    healthy (it has a health check) or, for one-shot jobs, to have succeeded."""
    for stack in (services(), services(COMPOSE, THREE_BROKERS)):
        for name, service in stack.items():
            for target, how in (service.get("depends_on") or {}).items():
                assert target in stack, f"{name} depends on unknown {target}"
                condition = how["condition"]
                if target in {"migrate", "kafka-init"}:
                    assert condition == "service_completed_successfully", (name, target)
                else:
                    assert condition == "service_healthy", (name, target)
                    check = stack[target].get("healthcheck", {})
                    assert check.get("test") and not check.get("disable"), f"{target}: no check"
    stack = services()
    for one_shot in ("migrate", "kafka-init"):
        assert stack[one_shot]["restart"] == "no"


def test_the_consumer_scales_and_each_service_runs_its_role() -> None:
    """`--scale consumer=3` works (no host port, no container name) and each service runs
    the command the platform documents."""
    stack = services()
    consumer, api = stack["consumer"], stack["api"]
    assert "ports" not in consumer and "container_name" not in consumer
    assert not any("container_name" in s for s in stack.values())
    assert consumer["command"] == ["python", "-m", "consumer", "run", "--role", "ingest"]
    assert api["command"] == ["python", "-m", "consumer", "run", "--role", "api"]
    assert api["ports"] == [f"127.0.0.1:8080:{SERVICE_PORT}"]
    assert stack["migrate"]["command"] == ["python", "-m", "consumer", "migrate"]
    assert stack["simulator"]["profiles"] == ["sim"]
    assert "python -m producer_sim" in stack["simulator"]["command"][0]
    assert stack["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in stack["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert stack["postgres"]["image"] == "postgres:16"
    assert "--partitions" in stack["kafka-init"]["command"][0]
    for topic in (
        "FLEET_METER_TOPIC",
        "FLEET_VEHICLE_TOPIC",
        "FLEET_MIXED_TOPIC",
        "FLEET_DLQ_TOPIC",
    ):
        created = environment(stack["kafka-init"])[topic]
        assert created, topic
        for name in ("consumer", "api", "simulator"):
            assert environment(stack[name])[topic] == created, (name, topic)
    assert int(environment(stack["kafka-init"])["FLEET_TOPIC_PARTITIONS"] or 0) >= 12


def test_every_mounted_path_exists_in_the_repository() -> None:
    """Each bind mount's source is a file or directory the repository has."""
    for path in (COMPOSE, THREE_BROKERS):
        for name, service in interpolate(load_yaml(path), {})["services"].items():
            for source, _ in bind_mounts(service):
                assert source.exists(), f"{name} mounts {source}, which does not exist"
                assert source.is_relative_to(ROOT / "deploy"), source
    init = [m for m in bind_mounts(services()["postgres"]) if m[0] == POSTGRES_INIT]
    assert [target for _, target in init] == ["/docker-entrypoint-initdb.d"]
    assert os.access(POSTGRES_INIT / "10-fleet-roles.sh", os.X_OK)


def test_every_setting_is_documented_in_env_example_with_the_compose_default() -> None:
    """Each variable the compose files read (secrets included) is in deploy/env.example,
    with the default compose falls back to; no password is written into a service."""
    documented = dict(
        re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    )
    for path in (COMPOSE, THREE_BROKERS):
        for name, default in compose_variables(path.read_text()).items():
            assert name in documented, f"{name} ({path.name}) is not in env.example"
            assert documented[name] == default, (name, documented[name], default)
    for name, service in services().items():
        for key, value in environment(service).items():
            if value is None:  # passed through from the shell or .env when set
                assert key in documented, key
            raw = environment(load_yaml(COMPOSE)["services"][name])[key] or ""
            if "PASSWORD" in key and value is not None:  # set here: from a variable
                assert raw.startswith("${"), f"{name}.{key} is not overridable"
            if password := re.search(r"://[^:/@]+:([^@]*)@", raw):
                assert password[1].startswith("${"), f"{name}.{key} has a fixed password"


def test_services_connect_as_their_own_database_login_with_the_init_scripts_passwords() -> None:
    """migrate as fleet_owner, consumer as fleet_consumer, api as fleet_api_reader, each
    with the password the postgres container hands its init script, also when overridden."""
    overrides = {
        "FLEET_OWNER_PASSWORD": "o-1",
        "FLEET_CONSUMER_PASSWORD": "c-2",
        "FLEET_API_READER_PASSWORD": "a-3",
        "FLEET_SESSIONS_PASSWORD": "s-4",
    }
    for env in ({}, overrides):
        stack = services(env=env)
        init_env = environment(stack["postgres"])
        expected = {
            "migrate": ("FLEET_DATABASE_URL", "fleet_owner", "FLEET_OWNER_PASSWORD"),
            "consumer": ("FLEET_DATABASE_URL", "fleet_consumer", "FLEET_CONSUMER_PASSWORD"),
            "api": ("FLEET_DATABASE_URL", "fleet_api_reader", "FLEET_API_READER_PASSWORD"),
            "sessions": ("FLEET_DATABASE_URL", "fleet_sessions_worker", "FLEET_SESSIONS_PASSWORD"),
            "simulator": ("SIM_ASSIGNMENTS_DSN", "fleet_owner", "FLEET_OWNER_PASSWORD"),
        }
        for name, (key, user, password_variable) in expected.items():
            dsn = urlsplit(environment(stack[name])[key] or "")
            assert (dsn.username, dsn.hostname, dsn.path) == (user, "postgres", "/fleet"), name
            assert dsn.password == init_env[password_variable], name
            if env:
                assert dsn.password == env[password_variable]
        api_env = environment(stack["api"])
        assert api_env["FLEET_API_DATABASE_URL"] == api_env["FLEET_DATABASE_URL"]


def test_prometheus_finds_every_replica_of_the_consumer_and_the_api() -> None:
    """Prometheus resolves the compose service names (one A record per replica) on the port
    the service serves /metrics on; promtool accepts the configuration."""
    stack = services()
    config = load_yaml(PROMETHEUS_CONFIG)
    discovered = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A" and sd["port"] == SERVICE_PORT, job["job_name"]
            for name in sd["names"]:
                assert name in stack, f"{job['job_name']} resolves {name}, not a compose service"
                discovered[name] = job["job_name"]
    assert discovered == {
        "consumer": "fleet-consumer",
        "api": "fleet-api",
        "sessions": "fleet-sessions",
    }
    assert str(SERVICE_PORT) in stack["consumer"]["expose"]
    mounts = dict((target, source) for source, target in bind_mounts(stack["prometheus"]))
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    promtool = os.environ.get("FLEET_TEST_PROMTOOL") or shutil.which("promtool")
    if not promtool:
        pytest.fail("needs promtool: apt-get install prometheus (or FLEET_TEST_PROMTOOL)")
    checked = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard_file() -> None:
    """Grafana's provisioning points at the compose Prometheus and at the directory the
    dashboard is mounted in; every panel uses that datasource and names a Prometheus job."""
    stack = services()
    mounts = {target: source for source, target in bind_mounts(stack["grafana"])}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA_PROVISIONING
    (datasource,) = [
        ds
        for path in sorted((provisioning / "datasources").glob("*.yml"))
        for ds in load_yaml(path)["datasources"]
    ]
    url = urlsplit(datasource["url"])
    assert (datasource["type"], url.hostname, url.port) == ("prometheus", "prometheus", 9090)
    assert not any("--web.listen-address" in arg for arg in stack["prometheus"]["command"])
    (provider,) = [
        p
        for path in sorted((provisioning / "dashboards").glob("*.yml"))
        for p in load_yaml(path)["providers"]
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).resolve() == DASHBOARD
    home = environment(stack["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for source in [panel, *panel.get("targets", [])]:
            if "datasource" in source:
                assert source["datasource"]["uid"] == datasource["uid"], panel["title"]
    targets = dashboard_targets()
    assert len(targets) >= 20
    for target in targets:
        for job in re.findall(r'job="([^"]+)"', target.expr):
            assert job in jobs, f"{target.panel}: job {job} is not scraped"


# --- the database roles ---------------------------------------------------------------------


def _on(dsn: str, port: int) -> str:
    """A compose DSN (host postgres:5432) pointed at the test's server."""
    parts = urlsplit(dsn)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))


async def test_the_init_script_creates_the_logins_that_migrate_consume_and_serve(
    broker: str,
) -> None:
    """On a fresh server the first-boot script (run twice: it is idempotent) creates the
    database and logins; with the DSNs compose builds, migrate runs as fleet_owner, the
    consumer stores readings as fleet_consumer and the API reads them as fleet_api_reader,
    which cannot change data. Passwords are checked (scram over TCP)."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        "FLEET_OWNER_PASSWORD": f"owner-{suffix}",
        "FLEET_CONSUMER_PASSWORD": f"consumer-{suffix}",
        "FLEET_API_READER_PASSWORD": f"reader-{suffix}",
        "FLEET_SESSIONS_PASSWORD": f"sessions-{suffix}",
    }
    stack = services(env=env)
    workdir = ARTIFACTS / f"deploy-{suffix}"  # kept, with the server's log, if the test fails
    server = start_local_postgres(workdir)
    try:
        socket_dsn = f"postgresql://postgres@/postgres?host={server.data_dir}&port={server.port}"
        init_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PG", "FLEET_"))},
            **{k: v for k, v in environment(stack["postgres"]).items() if v is not None},
            "PGHOST": str(server.data_dir),
            "PGPORT": str(server.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
        }
        for _ in range(2):
            script = await asyncio.create_subprocess_exec(
                "bash",
                str(POSTGRES_INIT / "10-fleet-roles.sh"),
                env=init_env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(script.communicate(), timeout=60)
            assert script.returncode == 0, stderr.decode()
        (server.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        admin = await asyncpg.connect(socket_dsn)
        try:
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()

        owner_dsn = _on(environment(stack["migrate"])["FLEET_DATABASE_URL"] or "", server.port)
        consumer_dsn = _on(environment(stack["consumer"])["FLEET_DATABASE_URL"] or "", server.port)
        reader_dsn = _on(environment(stack["api"])["FLEET_DATABASE_URL"] or "", server.port)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(consumer_dsn.replace(env["FLEET_CONSUMER_PASSWORD"], "wrong"))
        assert "009_roles.sql" in await migrate(owner_dsn)

        owner = await asyncpg.connect(owner_dsn)
        try:
            roles = {
                r["rolname"]: r
                for r in await owner.fetch(
                    "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole FROM pg_roles"
                    " WHERE rolname LIKE 'fleet%'"
                )
            }
            assert {n for n, r in roles.items() if r["rolcanlogin"]} == {
                "fleet_owner",
                "fleet_consumer",
                "fleet_api_reader",
                "fleet_sessions_worker",
            }
            assert {"fleet_writer", "fleet_reader", "fleet_api", "fleet_sessions"} <= set(roles)
            assert not any(r["rolsuper"] or r["rolcreaterole"] for r in roles.values())
            assert (
                await owner.fetchval(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'fleet'"
                )
                == "fleet_owner"
            )

            settings = make_settings(broker, consumer_dsn, session_timeout_ms=4000)
            await ensure_topics(broker, [*settings.topics, settings.dlq_topic], partitions=2)
            await publish_readings(broker, settings.meter_topic, [meter("m-compose", 0)])
            await Service(settings, Role.INGEST).run(idle_timeout=1.0)
            assert await offsets_reach(owner, settings.meter_topic, 1)
            assert await owner.fetchval("SELECT count(*) FROM meter_history") == 1

            sessions_dsn = _on(
                environment(stack["sessions"])["FLEET_DATABASE_URL"] or "", server.port
            )
            pool = await asyncpg.create_pool(sessions_dsn, min_size=1, max_size=1)
            try:
                await SessionWorker(pool, settings).cycle()  # as fleet_sessions_worker
            finally:
                await pool.close()
            assert await owner.fetchval("SELECT count(*) FROM batch_marks") == 0
        finally:
            await owner.close()

        api = Service(
            settings.model_copy(  # model_copy does not validate: secrets as SecretStr
                update={
                    "database_url": SecretStr(reader_dsn),
                    "api_database_url": SecretStr(reader_dsn),
                }
            ),
            Role.API,
        )
        try:
            assert await api.start()
            base = f"http://127.0.0.1:{settings.http_port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/v1/meters/m-compose/live") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["meterId"] == "m-compose"
                async with http.get(f"{base}/readyz") as resp:
                    assert resp.status == 200
        finally:
            await api.stop()
        reader = await asyncpg.connect(reader_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute("DELETE FROM meter_live")
        finally:
            await reader.close()
    finally:
        server.stop()
    shutil.rmtree(workdir)


# --- the dashboard against the running service ----------------------------------------------


@dataclass
class Live:
    settings: Settings
    exposition: str
    prometheus: str


@contextlib.contextmanager
def prometheus_like_deploy(targets: Mapping[str, str], workdir: Path) -> Iterator[str]:
    """A Prometheus with deploy/prometheus's jobs, each DNS-discovered job scraping the given
    host:port instead (every second); its URL."""
    deploy = load_yaml(PROMETHEUS_CONFIG)
    jobs = [
        {"job_name": job["job_name"], "static_configs": [{"targets": [targets[job["job_name"]]]}]}
        for job in deploy["scrape_configs"]
        if "dns_sd_configs" in job
    ]
    with running_prometheus(jobs, workdir) as url:
        yield url


@pytest.fixture(scope="module")
async def live(
    broker: str, admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    """The service (all roles) with every panel's series made: readings stored, re-sent and
    rejected, API calls that succeed and fail, readings POSTed; Prometheus scraping it as both
    jobs of deploy/prometheus throughout."""
    name = f"fleet_test_deploy_{uuid.uuid4().hex[:8]}"
    database = await fresh_database(admin_dsn, name)
    settings = make_settings(broker, database, session_timeout_ms=4000)
    await ensure_topics(broker, [*settings.topics, settings.dlq_topic], partitions=2)
    address = f"127.0.0.1:{settings.http_port}"
    workdir = tmp_path_factory.mktemp("prometheus")
    base = f"http://{address}"
    try:
        with prometheus_like_deploy(
            {"fleet-consumer": address, "fleet-api": address, "fleet-sessions": address}, workdir
        ) as prometheus:
            async with (
                running_service(settings),
                aiohttp.ClientSession() as http,
                contextlib.AsyncExitStack() as stack,
            ):
                db = await asyncpg.connect(settings.database_url.get_secret_value())
                stack.push_async_callback(db.close)

                async def scraped_as_every_job() -> bool:
                    query = {"query": "count(up == 1)"}
                    async with http.get(f"{prometheus}/api/v1/query", params=query) as resp:
                        result = (await resp.json())["data"]["result"]
                    return bool(result) and result[0]["value"][1] == "3"

                # A first scrape before any traffic: rates need a sample from before it.
                await wait_until(scraped_as_every_job, timeout=30)
                readings = mixed_fleet(5, 5, 3)
                sent = 0
                for second in range(3):  # stored across several scrapes
                    batch = readings[second * 10 : (second + 1) * 10]
                    sent += await publish_readings(broker, settings.mixed_topic, batch)
                    # a re-sent reading and a malformed message
                    sent += await publish(
                        broker, settings.mixed_topic, [encode(batch[0]), (b"k", b"{")]
                    )
                    for path in ("/v1/meters/m-0/live", "/v1/vehicles/nobody/live"):
                        async with http.get(base + path) as resp:
                            await resp.read()
                    body = [meter("m-http", second), {"meterId": "m-http"}]
                    async with http.post(f"{base}/v1/ingestion/telemetry", json=body) as resp:
                        assert resp.status == 202, await resp.text()
                    await wait_until(lambda n=sent: offsets_reach(db, settings.mixed_topic, n))
                    await asyncio.sleep(1.1)  # the next batch lands in a later scrape
                async with http.get(f"{base}/metrics") as resp:
                    exposition = await resp.text()
                yield Live(settings, exposition, prometheus)
    finally:
        await drop_database(admin_dsn, name)


async def test_every_metric_the_dashboard_queries_is_exported_by_the_service(live: Live) -> None:
    """Each metric in every panel's expression is one the running service declares on
    /metrics (histograms through their _bucket/_count series, counters with _total), and
    each label it filters or groups by is one that metric's samples carry."""
    names, labels = exported(live.exposition)
    problems = []
    for target in dashboard_targets():
        metrics = promql_metrics(target.expr)
        if not metrics:
            problems.append(f"{target.panel}: no metric in {target.expr}")
        for metric in sorted(metrics - PROMETHEUS_SYNTHETIC - names):
            problems.append(f"{target.panel}: {metric} is not exported")
        sampled = {m: labels[m] for m in metrics if m in labels} | {
            m: set() for m in metrics & PROMETHEUS_SYNTHETIC
        }
        if sampled.keys() == metrics:  # a labelled series not seen yet has no label names
            known = {"job", "instance"}.union(*sampled.values())
            for label in sorted(promql_labels(target.expr) - known):
                problems.append(f"{target.panel}: no {label} label on {sorted(metrics)}")
    assert not problems, "\n".join(problems)


async def test_prometheus_evaluates_every_dashboard_expression_and_each_panel_shows_data(
    live: Live,
) -> None:
    """A real Prometheus, scraping the service under deploy/prometheus's job names, accepts
    every panel's expression and returns a number for each panel (NaN does not count)."""
    targets = dashboard_targets()
    last: set[str] = set()
    async with aiohttp.ClientSession() as http:

        async def evaluate(expr: str) -> list[float]:
            query = expr.replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in query, f"an unhandled dashboard variable in {expr}"
            async with http.get(f"{live.prometheus}/api/v1/query", params={"query": query}) as r:
                body = await r.json()
            assert body["status"] == "success", (expr, body)
            return [float(result["value"][1]) for result in body["data"]["result"]]

        async def every_panel_shows_data() -> bool:
            shown = dict.fromkeys((t.panel for t in targets), False)
            for target in targets:
                values = await evaluate(target.expr)
                shown[target.panel] |= any(not math.isnan(v) for v in values)
            last.clear()
            last.update(panel for panel, ok in shown.items() if not ok)
            return not last

        try:
            await wait_until(every_panel_shows_data, timeout=30, interval=1)
        except TimeoutError:
            pytest.fail(f"panels without data: {sorted(last)}")
