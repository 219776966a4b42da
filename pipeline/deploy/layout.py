"""File names of the export stage's output (``data/export``), shared by the stage and the report (which must
not import the stage's code: its DVC dependencies stay the report's own)."""

INDEX_FILE = "rows.json"  # {"rows": [...]}: one entry per export row, in export.rows order
RESULT_FILE = "export.json"  # <key>/export.json: what runs, bytes, fidelity (reproducible)
MEASURE_FILE = "measure.timing.json"  # <key>/measure.timing.json: wall clock and peak memory (no output hash)
