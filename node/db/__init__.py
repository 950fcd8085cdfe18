"""The node's database: typed models, engine/session set-up and Alembic migrations."""

import logging

# Alembic narrates each plugin it loads (at import) and each step at INFO; node.db.migrate logs one
# line per schema change itself. Set here, the package's first import, so it precedes alembic's.
logging.getLogger("alembic").setLevel(logging.WARNING)
