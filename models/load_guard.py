"""Weights that did not load are refused: a model whose tensors kept their random initialisation
is not the model named on the command line, and its audit ("0.69x chance") would be read as that
model's re-linkage risk.

Every loader of an audited model reports what did not load as a `LoadProblems` and passes it to
`enforce`: Hugging Face (`from_pretrained(output_loading_info=True)`, models/external.py), open_clip
(its state dict compared with the model built from the config, models/external.py), and this
project's checkpoints (models/checkpoint.py). The DP stage on an existing model loads it through
models/external.py, so the same guard covers it (without the override: heads are never trained on
a partly random model). `enforce` raises, or with the explicit override (`model.allow_partial_load=
true`) returns the notes evaluate.py puts in the result's `meta.weights_not_loaded` (flagged in the
headline, report.md and audit.json, audit/result.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

OVERRIDE = "model.allow_partial_load=true"  # the one config key that audits such a model anyway
_SHOWN = 4  # keys named per kind in a message (a prefixed checkpoint misses every one)


@dataclass
class LoadProblems:
    """What a load left undone: keys the model expects that the weights lack (kept random), keys of
    the weights the model has no place for (dropped), and keys whose shapes differ (not loaded)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched or self.errors)

    def describe(self) -> str:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} tensor(s) missing from the weights, left at random initialisation "
                         f"({some(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} tensor(s) in the weights that the model has no place for "
                         f"({some(self.unexpected)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} tensor(s) of another shape than the model's, not loaded ("
                         + some([f"{k} {list(got)} vs the model's {list(want)}" for k, got, want in self.mismatched])
                         + ")")
        parts += self.errors
        return "; ".join(parts)


def compare_state_dict(expected: Mapping[str, Any], weights: Mapping[str, Any]) -> LoadProblems:
    """The keys and shapes of ``weights`` (tensors as read from the file) against the model's own
    ``state_dict()``: what `torch.nn.Module.load_state_dict` would refuse, listed."""
    mismatched = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    return LoadProblems(missing=sorted(k for k in expected if k not in weights),
                        unexpected=sorted(k for k in weights if k not in expected), mismatched=sorted(mismatched))


def enforce(problems: LoadProblems, where: str, allow: bool = False) -> list[str]:
    """Raise if the load left anything undone; with ``allow`` return the notes that flag the result
    (``[]`` for a complete load)."""
    if not problems:
        return []
    what = f"{where}: the weights did not fully load: {problems.describe()}"
    if allow:
        return [what]
    raise ValueError(f"{what}. The model would be audited with those tensors random, which measures a different "
                     "model than the one named (a checkpoint whose keys carry a prefix, e.g. 'clip_model.', loads "
                     "nothing at all). Save the weights under the model's own names, or fix the config so it "
                     f"builds the architecture the weights are for; {OVERRIDE} audits it anyway, flagged as "
                     "'weights did not fully load' in the headline, report.md and audit.json.")
