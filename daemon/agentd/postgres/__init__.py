"""The parts' storage on PostgreSQL (`[store] url`), one module per part, each beside the
SQLite implementation it mirrors: `steps.py` is `StepStore` (agentd/steps.py) on PostgreSQL,
and so on. Each takes a `PgStore` (agentd/store/postgres.py), keeps its statements
(`$1` placeholders) as module constants and writes through `PgStore.write`, whose ops are
coroutine functions of an asyncpg connection run in a grouped transaction. `app.py` picks
the SQLite or the PostgreSQL set once, from the configuration.
"""
