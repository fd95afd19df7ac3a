"""Tools that tuned solver="auto" (its plan of candidates, margins and checks): `python -m benchmarks.tuning.X`.

They measure on tuning mixtures and on the default problem set only; the held-out and fresh sets are for
checking that a tuned change transfers, never for choosing it (benchmarks/README.md)."""
