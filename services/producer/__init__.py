"""The warehouse producer: polls warehouse queries and produces one event per new row.

See ``core`` for the cursor semantics and their documented limits, ``queries`` for the
declared queries, ``sources`` for the warehouses and ``app`` for how it is wired.
"""
