"""The embedded synthetic cohort generator: cohort.py (SyntheticReader: generation, cache, loading),
params.py (CohortParams, GENERATOR_VERSION: the cache key), sampling.py (patients, studies, labels),
reports.py (report writing) and render.py (images). docs/cohorts.md describes the cohort."""
