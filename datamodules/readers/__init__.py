"""The real-cohort readers, each from the cohort's official on-disk layout to Study records:
mimic_cxr.py, chexpert_plus.py, openi.py; common.py holds what they share (CSV reading, image checks,
patient splits, label handling), report_sections.py the report section parser, and exporters.py writes
the synthetic cohort in each layout so the readers are tested without credentialed data
(docs/cohorts.md)."""
