"""Audit a model: `python evaluate.py audit=standard|hardneg|probe|all|adaptive ckpt_path=... [data=...]`,
`python evaluate.py audit=hardneg model=hf_clip|open_clip model.path=/models/x` (an existing
vision-language model from a local folder) or `python evaluate.py audit=hardneg embeddings=path.npz`
(precomputed embeddings of any model). The work is cxr_relink/evaluation.py's `evaluate(cfg)`; this file is
the Hydra entry point (the installed `cxr-relink-audit` command runs the same function)."""

import hydra
from omegaconf import DictConfig

from cxr_relink.configs import cli
from cxr_relink.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    with cli.usage_errors():
        evaluate(cfg)


if __name__ == "__main__":
    cli.run(main, "evaluate.yaml")  # usage mistakes: one clear message naming the valid choices, exit status 2
