"""Report documents: the single-model report built as one plain dict and rendered as JSON, Markdown,
HTML and JUnit, the search reports, and the files they are written to.

May import: every package below it, up to qtool.evaluation; never click or rich.
"""
