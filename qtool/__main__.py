"""`python -m qtool` runs the CLI."""

from qtool.cli.main import main

main()
