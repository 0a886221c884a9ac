"""The audit library: how re-linkable is a model, and what are its embeddings still good for.

Pure functions on embeddings; no Lightning (the callbacks in callbacks/ run this library during
training, evaluate.py on a checkpoint or a file of embeddings, bench/ and experiments/ directly).

embeddings  EmbeddingSet, input validation, the validation-output contract, the one report hash
counting    per-query counts of beaters and ties: one chunked pass over the similarities
recall      exact expected Recall@K at N (hypergeometric), rank statistics
stats       bootstrap over patients, percentile CIs
labels      pathology label groups (hard negatives)
relinkage   relinkage_audit: every variant (i2t, t2i, hard negatives, dedup) as JSON-able sections
probe       linear probe, macro AUROC over the CheXpert labels
membership  member vs non-member linkage test (the e^eps bound of a DP model)
one_run     empirical epsilon lower bound from one training run with canaries
result      the versioned audit.json schema, scalars, plot, report, and the one bundle writer
reference   Monte Carlo and explicit-pool references (tests and cross-checks)
settings    the audit settings' defaults, read from configs/audit/settings/
"""
