"""``reproduce``: one command per row of the paper's table, from the datasets as downloaded to
our numbers printed beside the published ones.

``recipe`` reads a row (a packaged TOML file, or a user's copy), ``sources`` says where each
dataset lives under DATA_ROOT and where to get it, ``runner`` runs convert → extract → train →
evaluate through the library's own stage functions (every stage resumes), and ``results``
writes WORK_DIR/results.md and results.json. This is the top layer beside ``demo``: it may use
every stage.
"""
