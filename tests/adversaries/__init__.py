"""Plugins that try to game or break the harness, one per finding of issue 12, importable by workers.

``cheats``: implementations that try to win without doing the work or to skew their neighbours;
``faults``: implementations whose harness-side code misbehaves; ``exits_at_import`` and
``threads_at_import``: plugin modules with module-level side effects, loaded through entry points.
"""
