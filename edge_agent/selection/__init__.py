"""Which model file and settings to serve on this box (internal): hardware profiles
(``profiles``), the pure choice (``choose``), measurements (``tuning``) and the self-tested
start (``selftest``).
"""
