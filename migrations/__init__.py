"""Alembic migrations of the node database (SQLite batch mode and PostgreSQL).

A package, so an installed node finds its migrations next to its code: :mod:`node.db.migrate`
builds the Alembic configuration in code (no ``alembic.ini``) with this folder as the script
location. To write a new revision, bring a scratch database to head and autogenerate against it::

    python -c "from alembic import command; from node.db.migrate import alembic_config; \
command.revision(alembic_config(url='sqlite:///scratch.sqlite'), 'what changed', autogenerate=True)"

then review the file: autogenerate writes batch operations (SQLite cannot ALTER most things) and
misses triggers, server-side functions and data moves. ``tests/node/test_db_migrations.py`` checks
that models and migrations agree and that every revision goes down and up with data present.
"""
