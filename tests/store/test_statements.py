"""The SQL written once for both databases (spike/app/store/statements.py), as each driver gets it."""

from __future__ import annotations

import re

import msgspec
import pytest

from spike.app.store.postgres_sql import PostgresDialect
from spike.app.store.sqlite_sql import SqliteDialect
from spike.app.store.statements import SQL, Statements

NAMED = re.compile(r"(?<![:\w]):\w+")


def statements(of: Statements) -> dict[str, str]:
    return msgspec.structs.asdict(of)


def test_postgresql_gets_psycopg_parameters_and_arrays() -> None:
    rendered = statements(PostgresDialect.sql)
    assert not [s for s in rendered.values() if NAMED.search(s)]
    assert rendered["prune_versions"] == (
        "DELETE FROM secret_version WHERE path = %(path)s AND version = ANY(%(versions)s)"
    )
    assert "CASE WHEN %(version)s = 0 THEN s.current_version ELSE %(version)s END" in rendered["value"]


def test_sqlite_gets_named_parameters_and_one_version_per_run() -> None:
    rendered = statements(SqliteDialect.sql)
    assert not [s for s in rendered.values() if "ANY(" in s or "%" in s]
    assert rendered["prune_versions"] == "DELETE FROM secret_version WHERE path = :path AND version = :versions"
    unchanged = {name for name, text in statements(SQL).items() if "ANY(" not in text}
    assert {name for name in unchanged if rendered[name] != getattr(SQL, name)} == set()


def test_a_percent_sign_is_refused_rather_than_misread_as_a_placeholder() -> None:
    with pytest.raises(ValueError, match="'%'"):
        Statements(count="SELECT count(*) FROM secret WHERE path LIKE 'a%'").rendered("%%(%s)s", "= ANY(:%s)")
