"""`cxr-relink-audit TARGET [--out DIR] [key=value ...]`: the installed command (pyproject.toml's
[project.scripts]) that audits one released model, the same `evaluate(cfg)` as `python evaluate.py`.

TARGET is what a privacy team holds:
* an embeddings file (`.npz`: image_emb, report_emb, study_id, patient_id[, labels, split]; evaluation.py's
  docstring) -> `embeddings=TARGET`: needs only the audit library's numpy/torch/scipy;
* a checkpoint of this project (`.ckpt`), or a run folder holding `checkpoints/last.ckpt` -> `ckpt_path=`;
* a Hugging Face CLIP / SigLIP folder (`config.json`) -> `model=hf_clip model.path=TARGET`;
* an open_clip folder (`open_clip_config.json`) -> `model=open_clip model.path=TARGET`.
A model is embedded on the cohort its `data=` override names (default: the synthetic cohort), so a real
cohort is `data=mimic_cxr data.root=/data/mimic` after TARGET. Other `key=value` words are evaluate.yaml
overrides (`audit=hardneg`, `split=val`, ...). Results (audit.json, report.md, recall_vs_n.png) go to
--out, which must not hold an audit already (nothing is overwritten unless --overwrite); logs and caches
go under the current directory (CXR_RELINK_ROOT), never into the installed package.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def target_overrides(target: str | os.PathLike) -> list[str]:
    """The evaluate.yaml overrides that audit ``target``, or a ValueError saying what it should be."""
    path = Path(target)
    if not path.exists():
        raise ValueError(f"{path} does not exist: give an embeddings .npz, a .ckpt, a run folder, or a model folder")
    if path.is_file():
        if path.suffix == ".npz":
            return [f"embeddings={path.resolve()}"]
        if path.suffix == ".ckpt":
            return [f"ckpt_path={path.resolve()}"]
        raise ValueError(f"{path}: expected an embeddings file (.npz) or a checkpoint (.ckpt), got a {path.suffix or 'suffix-less'} file")
    if (path / "checkpoints" / "last.ckpt").is_file():
        return [f"ckpt_path={(path / 'checkpoints' / 'last.ckpt').resolve()}"]
    if (path / "open_clip_config.json").is_file():
        return ["model=open_clip", f"model.path={path.resolve()}"]
    if (path / "config.json").is_file():
        return ["model=hf_clip", f"model.path={path.resolve()}"]
    raise ValueError(f"{path} is a folder with neither checkpoints/last.ckpt (a run of this project), config.json "
                     "(a Hugging Face CLIP / SigLIP folder) nor open_clip_config.json (an open_clip folder)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cxr-relink-audit", description=__doc__.split("\n\n")[0],
                                 epilog="overrides: evaluate.yaml keys, e.g. audit=hardneg data=mimic_cxr data.root=/data")
    ap.add_argument("target", help="an embeddings .npz, a .ckpt, a run folder, or a HF CLIP / open_clip folder")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/evaluate.yaml")
    ap.add_argument("--out", default="cxr_relink_audit", help="output folder (default ./cxr_relink_audit)")
    ap.add_argument("--overwrite", action="store_true", help="replace an audit already in --out")
    args = ap.parse_intermixed_args(argv)
    out = Path(args.out).resolve()
    if (out / "audit.json").exists() and not args.overwrite:
        ap.exit(2, f"cxr-relink-audit: {out} already holds an audit (audit.json); choose another --out or "
                   "pass --overwrite\n")
    try:
        overrides = target_overrides(args.target)
    except ValueError as e:
        ap.exit(2, f"cxr-relink-audit: {e}\n")
    bad = [w for w in args.overrides if "=" not in w]
    if bad:
        ap.exit(2, f"cxr-relink-audit: {bad} are not key=value overrides (one TARGET only)\n")
    # Logs and caches under the working directory: an installed package's folder is not a place to write.
    os.environ.setdefault("CXR_RELINK_ROOT", str(Path.cwd()))
    import hydra

    from cxr_relink.configs import CONFIG_DIR, cli
    from cxr_relink.evaluation import evaluate

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate.yaml")
    def run(cfg) -> None:
        with cli.usage_errors():
            evaluate(cfg)

    # Hydra reads its overrides from sys.argv: the command's words become evaluate.yaml overrides.
    sys.argv = [sys.argv[0], *overrides, *args.overrides, f"paths.output_dir={out}", f"hydra.run.dir={out}"]
    cli.run(run, "evaluate.yaml")


if __name__ == "__main__":
    main()
