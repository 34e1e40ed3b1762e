"""`python -m qtool` runs the CLI."""

from qtool.cli.launch import main

main()
