"""The command line: click commands that parse, call one use case, render the result and map errors
to exit codes; the only package that prints (rich on a terminal, plain lines otherwise).

May import: anything in qtool.
"""
