"""Alembic migrations (``pipeline.migrate``, ``bindpipe migrate``) on PostgreSQL and SQLite.

The initial revision must build exactly what ``Base.metadata.create_all`` builds, including the
parts the models add outside the table classes: the ``btree_gist`` extension and the PF/VF
exclusion constraint on PostgreSQL, the PF/VF trigger on SQLite, and the partial owner index.
It is checked three ways: Alembic's ``compare_metadata`` finds nothing, the catalog of a migrated
database equals the catalog of a ``create_all`` one, and the guards refuse what they must.
"""

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from pipeline import migrate
from pipeline.cli import app
from pipeline.db import create_schema, make_engine
from pipeline.models.tables import Base
from pipeline.store.pci import device_holders
from pipeline.store.topology import failed_ports_on_host
from pipeline.workers.republish import relay_query
from tests.services import fresh_database

pytestmark = pytest.mark.services

HEAD = "0007"
PF, VF0, VF1 = "0000:81:00.0", "0000:81:10.0", "0000:81:10.1"


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def engine_of() -> Iterator:
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engines.append(make_engine(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def created_all_pg_url() -> Iterator[str]:
    """A second fresh PostgreSQL database, built by ``create_all``."""
    url, drop = fresh_database(uuid.uuid4().hex[:10])
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    yield url
    drop()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def model_differences(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def pg_catalog(engine: Engine) -> dict[str, list[tuple]]:
    """Everything of the public schema that create_all or a migration makes (Alembic's own table aside)."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable, "
                   "column_default FROM information_schema.columns WHERE table_schema = 'public' "
                   "AND table_name <> 'alembic_version'",
        "constraints": "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
                       "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
                       "AND conrelid::regclass::text <> 'alembic_version'",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                   "AND tablename <> 'alembic_version'",
        "sequences": "SELECT sequence_name, data_type FROM information_schema.sequences "
                     "WHERE sequence_schema = 'public'",
        "extensions": "SELECT extname FROM pg_extension",
        "triggers": "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal",
    }
    with engine.connect() as conn:
        return {name: sorted(tuple(row) for row in conn.execute(text(sql))) for name, sql in queries.items()}


def sqlite_catalog(engine: Engine) -> list[tuple]:
    """sqlite_master's rows; a table that a batch migration rebuilt has its name quoted, nothing else."""
    with engine.connect() as conn:
        return sorted((kind, name, table, sql and sql.replace(f'"{table}"', table)) for kind, name, table, sql in
                      conn.execute(text("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                        "WHERE tbl_name <> 'alembic_version'")))


def insert_device(conn, address: str, is_pf: int, owner: str | None, host: str = "compute-1") -> None:  # noqa: ANN001
    conn.execute(text(
        "INSERT INTO pci_devices (host, address, vendor_id, product_id, dev_type, parent_addr, pf_group, is_pf, "
        "inventory, status, owner_port_id, updated_at) VALUES (:h, :a, '8086', '154c', :t, :p, :g, :pf, '{}', "
        ":s, :o, CURRENT_TIMESTAMP)"),
        {"h": host, "a": address, "t": "type-PF" if is_pf else "type-VF", "p": None if is_pf else PF, "g": PF,
         "pf": is_pf, "s": "allocated" if owner else "available", "o": owner})


def set_owner(engine: Engine, address: str, owner: str | None, host: str = "compute-1") -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE pci_devices SET owner_port_id = :o WHERE host = :h AND address = :a"),
                     {"o": owner, "h": host, "a": address})


# --- PostgreSQL ----------------------------------------------------------------------------------

def test_upgrade_head_on_a_fresh_postgres_database_matches_the_models(pg_url: str, engine_of):
    assert migrate.current(pg_url) is None
    assert migrate.head() == HEAD
    assert migrate.upgrade(pg_url) == HEAD
    assert migrate.current(pg_url) == HEAD
    engine = engine_of(pg_url)
    assert model_differences(engine) == []
    migrate.check(pg_url)  # compare_metadata, the partial index's WHERE and the exclusion constraint
    assert set(inspect(engine).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    assert migrate.upgrade(pg_url) == HEAD  # again: nothing to do


def test_a_migrated_postgres_catalog_equals_create_all(pg_url: str, created_all_pg_url: str, engine_of):
    migrate.upgrade(pg_url)
    migrated, created = pg_catalog(engine_of(pg_url)), pg_catalog(engine_of(created_all_pg_url))
    assert migrated == created
    assert ("btree_gist",) in migrated["extensions"]
    assert ("pci_devices", "uq_pci_devices_owner", "CREATE UNIQUE INDEX uq_pci_devices_owner ON public.pci_devices "
            "USING btree (owner_port_id, host) WHERE (owner_port_id IS NOT NULL)") in migrated["indexes"]
    assert {name for _, name, kind, _ in migrated["constraints"] if kind == "f"} == {"fk_segments_network_id_networks"}


def test_0002_puts_the_port_first_in_the_owner_index_and_the_holders_query_uses_it(pg_url: str, engine_of):
    def owner_index(engine: Engine) -> str:
        with engine.connect() as conn:
            return conn.execute(text("SELECT indexdef FROM pg_indexes "
                                     "WHERE indexname = 'uq_pci_devices_owner'")).scalar_one()

    engine = engine_of(pg_url)
    assert migrate.upgrade(pg_url, "0001") == "0001"
    assert "(host, owner_port_id)" in owner_index(engine)
    with engine.begin() as conn:
        insert_device(conn, VF0, 0, "port-a")
    assert migrate.upgrade(pg_url) == HEAD
    assert "(owner_port_id, host) WHERE (owner_port_id IS NOT NULL)" in owner_index(engine)
    with pytest.raises(IntegrityError), engine.begin() as conn:  # still one device per port and host
        insert_device(conn, VF1, 0, "port-a")
    with engine.begin() as conn:  # a cloud's worth of devices in use: a scan would read them all
        conn.execute(text(
            "INSERT INTO pci_devices (host, address, vendor_id, product_id, dev_type, pf_group, is_pf, inventory, "
            "status, owner_port_id, updated_at) SELECT 'c-' || n / 64, '0000:' || n % 64, '8086', '154c', "
            "'type-VF', 'g', 0, '{}', 'allocated', 'p-' || n, CURRENT_TIMESTAMP FROM generate_series(1, 20000) AS n"))
        conn.execute(text("ANALYZE pci_devices"))
    with engine.begin() as conn:
        plan = "\n".join(conn.execute(text("EXPLAIN SELECT owner_port_id FROM pci_devices "
                                            "WHERE owner_port_id = ANY(ARRAY['port-a', 'port-b'])")).scalars())
        assert device_holders(Session(conn), ["port-a", "port-b"]) == {"port-a": {"compute-1"}}
    assert "uq_pci_devices_owner" in plan, plan
    assert migrate.downgrade(pg_url, "0001") == "0001"
    assert "(host, owner_port_id)" in owner_index(engine)


def upgrade_over_history(pg_url: str, engine: Engine, before: str, history: str, table: str) -> None:
    """Migrate to ``before``, fill it with ``history`` (SQL), upgrade to head and analyze ``table``:
    a new index is judged by the plans of a database with a past, not of an empty one."""
    assert migrate.upgrade(pg_url, before) == before
    with engine.begin() as conn:
        conn.execute(text(history))
    assert migrate.upgrade(pg_url) == HEAD
    with engine.begin() as conn:
        conn.execute(text(f"ANALYZE {table}"))


def test_0003_indexes_the_unpublished_results_and_the_relay_reads_only_them(pg_url: str, engine_of):
    engine = engine_of(pg_url)
    upgrade_over_history(pg_url, engine, "0002", (  # a long history, all of it published but one result
        "INSERT INTO results (event_id, port_id, host, body, created_at, published_at) SELECT 'e' || n, "
        "'p' || n, 'h', '{}', now() - interval '1 hour', CASE WHEN n = 7 THEN NULL ELSE now() END "
        "FROM generate_series(1, 20000) AS n"), "results")
    with engine.begin() as conn:
        query = relay_query(datetime.now(UTC)).compile(conn, compile_kwargs={"literal_binds": True})
        plan = "\n".join(conn.execute(text(f"EXPLAIN {query}")).scalars())
        assert [r.seq for r in Session(conn).scalars(relay_query(datetime.now(UTC)))] == [7]
    assert "ix_results_unpublished" in plan, plan
    assert migrate.downgrade(pg_url, "0002") == "0002"
    assert "ix_results_unpublished" not in {ix["name"] for ix in inspect(engine).get_indexes("results")}


def test_0004_indexes_failed_bindings_by_host_and_a_revival_reads_only_them(pg_url: str, engine_of):
    engine = engine_of(pg_url)
    upgrade_over_history(pg_url, engine, "0003", (  # many good bindings, two failed on the revived host
        "INSERT INTO bindings (port_id, host, status, vnic_type, profile, vif_type, vif_details, levels, "
        "event_id, updated_at) SELECT 'p' || n, 'h' || (n % 500), 'ACTIVE', 'normal', '{}', CASE WHEN n IN (3, 503) "
        "THEN 'binding_failed' ELSE 'ovs' END, '{}', '[]', 'e', now() FROM generate_series(1, 20000) AS n"), "bindings")
    with engine.begin() as conn:
        with Session(conn) as session:
            statements = []
            event.listen(conn, "before_cursor_execute", lambda *args: statements.append(args[2:4]))
            assert sorted(failed_ports_on_host(session, "h3")) == ["p3", "p503"]
            sql, parameters = statements[-1]  # as sent: the vif_type written in, the rest bound
            plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + sql, parameters).scalars())
    assert "ix_bindings_failed_by_host" in plan, plan
    assert migrate.downgrade(pg_url, "0003") == "0003"


def test_0005_drops_the_indexes_no_query_reads_and_its_downgrade_restores_them(pg_url: str, engine_of):
    engine = engine_of(pg_url)
    dropped = {("results", "ix_results_event_id"), ("ports", "ix_ports_network_id"), ("ports", "ix_ports_host")}

    def indexes() -> set[tuple[str, str]]:
        inspector = inspect(engine)
        return {(table, ix["name"]) for table in ("results", "ports") for ix in inspector.get_indexes(table)}

    assert migrate.upgrade(pg_url, "0004") == "0004"
    assert dropped <= indexes()
    assert migrate.upgrade(pg_url) == HEAD
    after = indexes()
    assert not dropped & after and ("results", "ix_results_port_id") in after  # the others stay
    assert migrate.downgrade(pg_url, "0004") == "0004"
    assert dropped <= indexes()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_0006_keeps_dead_letter_bodies_as_bytes_and_the_old_rows_whole(dialect: str, pg_url: str, tmp_path: Path,
                                                                          engine_of):
    """A row written before keeps its text as UTF-8 bytes, its category and hash are filled in; a
    body with a NUL byte (which a text column refused) is stored; the downgrade gives the text back."""
    import hashlib

    url = pg_url if dialect == "postgresql" else sqlite_url(tmp_path / "dl.db")
    assert migrate.upgrade(url, "0005") == "0005"
    engine = engine_of(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO dead_letters (stage, reason, event_id, port_id, body, received_at) "
                          "VALUES ('validate', 'bad_json: body is not JSON', NULL, NULL, '{\"é\": ', :at)"),
                     {"at": datetime.now(UTC)})
    assert migrate.upgrade(url) == HEAD
    with engine.begin() as conn:
        body, category, digest = conn.execute(text("SELECT body, category, body_sha256 FROM dead_letters")).one()
        assert bytes(body) == '{"é": '.encode() and category == "bad_json"
        assert digest == hashlib.sha256('{"é": '.encode()).hexdigest()
        conn.execute(text("INSERT INTO dead_letters (stage, category, reason, body, body_sha256, received_at) "
                          "VALUES ('validate', 'bad_json', 'bad_json: x', :body, 'h', :at)"),
                     {"body": b"\x00\xff not json", "at": datetime.now(UTC)})
    assert model_differences(engine) == []
    assert migrate.downgrade(url, "0005") == "0005"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT body FROM dead_letters ORDER BY id")).scalars().first() == '{"é": '


def test_the_migrated_exclusion_constraint_exists_and_refuses_a_pf_beside_its_vf(pg_url: str, engine_of):
    migrate.upgrade(pg_url)
    engine = engine_of(pg_url)
    with engine.connect() as conn:
        definition = conn.execute(text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'ex_pci_devices_pf_vf' "
            "AND contype = 'x' AND conrelid = 'pci_devices'::regclass")).scalar_one()
    assert definition == ("EXCLUDE USING gist (host WITH =, pf_group WITH =, is_pf WITH <>) "
                          "WHERE ((owner_port_id IS NOT NULL))")

    with engine.begin() as conn:
        insert_device(conn, PF, 1, None)
        insert_device(conn, VF0, 0, "port-a")
        insert_device(conn, VF1, 0, None)
        insert_device(conn, PF, 1, "port-x", host="compute-2")  # another host: another group
    with pytest.raises(IntegrityError):  # update: the PF while its VF is owned
        set_owner(engine, PF, "port-b")
    with pytest.raises(IntegrityError), engine.begin() as conn:  # insert: an owned VF beside an owned PF
        insert_device(conn, PF, 1, "port-p", host="compute-3")
        insert_device(conn, VF0, 0, "port-v", host="compute-3")
    set_owner(engine, VF1, "port-c")  # a sibling VF is legal
    set_owner(engine, VF0, None)
    set_owner(engine, VF1, None)
    set_owner(engine, PF, "port-b")  # and the PF once its VFs are free


def test_check_reports_drift_on_postgres(pg_url: str, engine_of):
    migrate.upgrade(pg_url)
    engine = engine_of(pg_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE pci_devices DROP CONSTRAINT ex_pci_devices_pf_vf"))
        conn.execute(text('ALTER TABLE agents ALTER COLUMN "binary" TYPE varchar(65)'))
        conn.execute(text("DROP INDEX uq_pci_devices_owner"))
        conn.execute(text("CREATE UNIQUE INDEX uq_pci_devices_owner ON pci_devices (host, owner_port_id)"))
    with pytest.raises(migrate.SchemaMismatch) as caught:
        migrate.check(pg_url)
    found = str(caught.value)
    assert "missing_exclusion_constraint" in found
    assert "modify_type" in found and "'binary'" in found
    assert "modify_index_where" in found and "uq_pci_devices_owner" in found


def test_downgrade_to_base_drops_everything_on_postgres(pg_url: str, engine_of):
    migrate.upgrade(pg_url)
    assert migrate.downgrade(pg_url, "base") is None
    assert migrate.current(pg_url) is None
    catalog = pg_catalog(engine_of(pg_url))
    assert catalog["extensions"] == [("plpgsql",)]
    assert all(rows == [] for name, rows in catalog.items() if name != "extensions"), catalog
    assert set(inspect(engine_of(pg_url)).get_table_names()) <= {"alembic_version"}
    assert migrate.upgrade(pg_url) == HEAD  # and back up
    assert model_differences(engine_of(pg_url)) == []


# --- SQLite --------------------------------------------------------------------------------------

def test_upgrade_head_on_sqlite_matches_create_all_with_the_trigger(tmp_path: Path, engine_of):
    url = sqlite_url(tmp_path / "migrated.db")
    assert migrate.upgrade(url) == HEAD
    assert migrate.current(url) == HEAD
    engine = engine_of(url)
    assert model_differences(engine) == []
    migrate.check(url)
    with engine.connect() as conn:
        trigger = conn.execute(text("SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' "
                                    "AND name = 'tr_pci_devices_pf_vf'")).scalar_one()
    assert trigger == "pci_devices"

    created = engine_of(sqlite_url(tmp_path / "created.db"))
    create_schema(created)
    assert sqlite_catalog(engine) == sqlite_catalog(created)

    with engine.begin() as conn:
        insert_device(conn, PF, 1, None)
        insert_device(conn, VF0, 0, "port-a")
    with pytest.raises(IntegrityError):
        set_owner(engine, PF, "port-b")
    set_owner(engine, VF0, None)
    set_owner(engine, PF, "port-b")


def test_downgrade_to_base_drops_everything_on_sqlite(tmp_path: Path, engine_of):
    url = sqlite_url(tmp_path / "migrated.db")
    migrate.upgrade(url)
    assert migrate.downgrade(url, "base") is None
    assert sqlite_catalog(engine_of(url)) == []


def test_a_create_all_database_is_adopted_only_when_it_matches(tmp_path: Path, engine_of):
    url = sqlite_url(tmp_path / "embedded.db")
    create_schema(engine_of(url))
    assert migrate.current(url) is None
    assert migrate.upgrade(url) == HEAD  # stamped, nothing created twice

    tampered = sqlite_url(tmp_path / "tampered.db")
    engine = engine_of(tampered)
    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER tr_pci_devices_pf_vf"))
    with pytest.raises(migrate.SchemaMismatch, match="missing_trigger"):
        migrate.upgrade(tampered)
    assert migrate.current(tampered) is None


# --- bindpipe migrate ----------------------------------------------------------------------------

def test_bindpipe_migrate(pg_url: str):
    runner = CliRunner()
    env = {"BINDPIPE_DATABASE_URL": pg_url, "BINDPIPE_CONFIG_FILE": None}

    checked = runner.invoke(app, ["migrate", "--check"], env=env)
    assert checked.exit_code == 1, checked.output
    assert "revision before: (none)" in checked.output

    done = runner.invoke(app, ["migrate"], env=env)
    assert done.exit_code == 0, done.output
    assert "revision before: (none)" in done.output
    assert f"revision after: {HEAD}" in done.output
    assert migrate.current(pg_url) == HEAD

    checked = runner.invoke(app, ["migrate", "--check"], env=env)
    assert checked.exit_code == 0, checked.output
    assert f"schema matches the models at head {HEAD}" in checked.output

    again = runner.invoke(app, ["migrate", "--revision", "head"], env=env)
    assert again.exit_code == 0, again.output
    assert f"revision before: {HEAD}" in again.output and f"revision after: {HEAD}" in again.output

