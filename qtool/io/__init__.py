"""Files in and out: model files (safe loading, external data, opset upgrade, saving), data folders
and images as model feeds, and atomic writing of artifacts.

May import: qtool.errors, qtool.numerics, qtool.recipe.
"""
