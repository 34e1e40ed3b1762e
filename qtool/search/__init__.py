"""The search: trials (a recipe plus per-node promotions, scored against the float model), the
sensitivity ranking, the promotion search, where trials run (executors), and the sensitivity and
tune use cases built on qtool.api.

May import: everything below the CLI, qtool.api included; never click or rich.
"""
