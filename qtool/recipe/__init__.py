"""The recipe: its typed sections with their defaults and allowed values (schema), and reading a YAML
file into one, with errors that name the file, line and key (load).

May import: qtool.errors, qtool.numerics.
"""
