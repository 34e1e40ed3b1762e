"""Running work on a Ray cluster: connecting (or starting a local instance), putting what every task
reads into Ray's object store once, streaming results back as tasks finish, retrying tasks whose
worker or node was lost, and cancelling the rest on Ctrl-C. Ray is an optional dependency
(`pip install 'qtool-onnx[ray]'`); without it `--executor ray` is a usage error.

May import: qtool.errors; Ray itself only inside functions, never at import time.
"""
