"""Why did the LLM text tower's seed 2 train worse at scale `paper`? (docs/llm_seed_failure.md)

Reruns the paper-scale LLM arm (stage 1 `experiment=text_adapt`, then stage 2 `model=llm_encoder` on
its exported tower) with the two seeds crossed: stage-2 seed x stage-1 checkpoint, so that a bad
result can be attributed to stage 1 (the adapted tower) or to stage 2 (LoRA/head/CNN init, data order).
Per run it keeps the CSV log (per-epoch val loss and val Recall@1 at N=100, per-10-step train loss,
temperature and lr) and, per optimizer step, the gradient norm before clipping of each part of the
model (image tower, image head, LoRA, pooler, text head, logit scale) in grad_norms.jsonl.

Differences from experiments/reproduce.py's runs, chosen to save CPU and stated in the doc: no final
test audit (final_audit=false) and no extra test patients (data.reader.test_patients: the train and
val splits are byte-identical without them); the comparison uses the per-epoch val audit.

    python -m experiments.seed_diagnosis stage1 --seeds 0 2
    python -m experiments.seed_diagnosis stage2 --pairs 2:2 0:2 2:0   # <stage-1 seed>:<stage-2 seed>
    python -m experiments.seed_diagnosis stage2 --pairs 2:2 --tag warmup20 -- model.scheduler.warmup_fraction=0.2
    python -m experiments.seed_diagnosis summary
    python -m experiments.seed_diagnosis probe-stage1 --seeds 0 2   # representation statistics, no training

Resumable: a run whose `done.json` exists is skipped, and so is one that another live process is
training (its `running.pid`), so two invocations can share the work. Outputs under --out (default logs/seed_diagnosis).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
from pathlib import Path

from lightning.pytorch import Callback

from cxr_relink.configs import ROOT

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger("seed_diagnosis")

# The paper scale's sizing (experiments/reproduce.py, scale "paper"), minus the test-only patients.
SIZING = ["trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false", "logger=csv",
          "data.reader.label_profile=mimic", "final_audit=false"]

# Parameter-name prefixes -> the part of the model they belong to (DualTowerModule / TextAdaptModule).
PARTS = (("image_tower.", "image_tower"), ("image_head.", "image_head"), ("text_head.", "text_head"),
         ("text_tower.pooler.", "pooler"), ("text_tower.lm_head.", "lm_head"), ("logit_scale", "logit_scale"))


def part_of(name: str) -> str:
    for prefix, part in PARTS:
        if name.startswith(prefix):
            return part
    if name.startswith("text_tower."):
        return "lora" if "lora_" in name else "text_base"
    return "other"


class GradNormLog(Callback):
    """Lightning callback: per optimizer step, the L2 norm of the gradients (before clipping: Lightning
    calls on_before_optimizer_step before it clips) of each part of the model, plus the total, the
    logit scale and the lr, as JSON lines in <output_dir>/grad_norms.jsonl."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.fh = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        sq: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                part = part_of(name)
                sq[part] = sq.get(part, 0.0) + float(p.grad.detach().float().pow(2).sum())
        rec = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "total": math.sqrt(sum(sq.values())), **{k: math.sqrt(v) for k, v in sq.items()},
               "lr": optimizer.param_groups[0]["lr"]}
        if hasattr(pl_module, "logit_scale"):
            rec["logit_scale"] = float(pl_module.logit_scale.detach())
        if self.fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "w")
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()


def run_train(out: Path, overrides: list[str]) -> dict:
    """train.train() on the composed config, with the grad-norm callback added; writes done.json."""
    from omegaconf import open_dict

    from cxr_relink.configs import compose
    from train import train

    if (out / "done.json").exists():
        log.info("reused %s", out)
        return json.loads((out / "done.json").read_text())
    pid_file = out / "running.pid"
    if pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists():
        log.info("%s is being trained by process %s; skipped", out, pid_file.read_text().strip())
        return {}
    out.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    cfg = compose("train.yaml", overrides + SIZING)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.callbacks["grad_norm"] = {"_target_": "experiments.seed_diagnosis.GradNormLog", "path": str(out / "grad_norms.jsonl")}
    t0 = time.time()
    metrics, _ = train(cfg)
    rec = {"overrides": overrides + SIZING, "seconds": round(time.time() - t0, 1),
           "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, float)}}
    (out / "done.json").write_text(json.dumps(rec, indent=1))
    pid_file.unlink()
    return rec


def stage1_dir(out: Path, seed: int) -> Path:
    return out / "stage1" / f"s{seed}"


def cmd_stage1(args) -> None:
    for s in args.seeds:
        run_train(stage1_dir(args.out, s), ["experiment=text_adapt", f"seed={s}", *args.extra])


def cmd_stage2(args) -> None:
    for pair in args.pairs:
        st1, st2 = (int(x) for x in pair.split(":"))
        hf = stage1_dir(args.out, st1) / "text_tower_hf"
        if not hf.exists():
            raise FileNotFoundError(f"{hf}: run `stage1 --seeds {st1}` first")
        name = f"st1_{st1}__seed_{st2}" + (f"__{args.tag}" if args.tag else "")
        run_train(args.out / "stage2" / name,
                  ["model=llm_encoder", f"model.text_tower.pretrained={hf}", f"seed={st2}", *args.extra])


def read_csv_metrics(run: Path) -> list[dict]:
    f = run / "csv" / "metrics.csv"
    if not f.exists():
        return []
    with open(f) as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def epoch_table(rows: list[dict], keys: list[str]) -> dict[int, dict]:
    table: dict[int, dict] = {}
    for r in rows:
        if "epoch" not in r:
            continue
        e = int(r["epoch"])
        for k in keys:
            if k in r:
                table.setdefault(e, {})[k] = r[k]
    return table


def cmd_summary(args) -> None:
    keys2 = ["val/loss", "audit/i2t/R@1/N=100", "train/loss_epoch", "val/i2t_acc"]
    keys1 = ["val/loss", "val/mntp_loss", "val/supcon_loss", "val/variant_acc", "val/error_disc", "train/loss_epoch"]
    for stage, keys in (("stage1", keys1), ("stage2", keys2)):
        for run in sorted((args.out / stage).glob("*")):
            table = epoch_table(read_csv_metrics(run), keys)
            print(f"== {stage}/{run.name}" + ("" if (run / "done.json").exists() else " (unfinished)"))
            print("  epoch " + " ".join(f"{k:>22s}" for k in keys))
            for e in sorted(table):
                print(f"  {e:5d} " + " ".join(f"{table[e].get(k, float('nan')):22.4f}" for k in keys))
            gn = run / "grad_norms.jsonl"
            if gn.exists():
                recs = []
                for line in gn.read_text().splitlines():
                    try:
                        recs.append(json.loads(line.strip("\x00")))
                    except json.JSONDecodeError:
                        pass  # a line garbled by an interrupted writer
                if not recs:
                    continue
                parts = [k for k in recs[0] if k not in ("step", "epoch", "lr")]
                print("  grad norms (before clipping), median / max per epoch:")
                for e in sorted({r["epoch"] for r in recs}):
                    rs = [r for r in recs if r["epoch"] == e]
                    cells = []
                    for k in parts:
                        v = sorted(r[k] for r in rs if k in r)
                        if v:
                            cells.append(f"{k}={v[len(v) // 2]:.3g}/{v[-1]:.3g}")
                    print(f"    epoch {e}: " + " ".join(cells))


def cmd_probe_stage1(args) -> None:
    """Statistics of each stage-1 tower's pooled report embeddings on the val split (no training):
    mean pairwise cosine (anisotropy), effective rank (exp entropy of the singular values), variant
    top-1 accuracy and the share of the variance in the first principal component."""
    import torch
    import torch.nn.functional as F

    from cxr_relink.configs import compose
    from hydra.utils import instantiate

    for s in args.seeds:
        hf = stage1_dir(args.out, s) / "text_tower_hf"
        cfg = compose("train.yaml", ["model=llm_encoder", f"model.text_tower.pretrained={hf}", f"seed={s}",
                                     "data.reader.label_profile=mimic", "logger=csv"])
        cfg.paths.output_dir = str(args.out / "probe")
        dm = instantiate(cfg.data)
        dm.setup("fit")
        tower = instantiate(cfg.model.text_tower, tokenizer=dm.tokenizer).eval()
        embs, hid_norms, labels, study = [], [], [], []
        with torch.no_grad():
            for i, batch in enumerate(dm.val_dataloader()):
                h = tower.hidden_states(batch["input_ids"], batch["attention_mask"])
                hid_norms.append(h[batch["attention_mask"].bool()].norm(dim=-1))
                embs.append(tower.pool(h, batch["attention_mask"]))
                labels.append(batch["labels"])
                study.append(batch["study_idx"])
        z, labels, study = torch.cat(embs), torch.cat(labels), torch.cat(study)
        # one row per study (a study's images share its report)
        first = {int(x): j for j, x in reversed(list(enumerate(study.tolist())))}
        keep = torch.tensor(sorted(first.values()))
        z, labels = z[keep], torch.nan_to_num(labels[keep].float(), nan=0.0)
        # label content of the frozen tower: does a report's nearest other report (cosine) carry the
        # same 14-label vector? (chance: the share of same-label pairs)
        sim = F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T
        sim.fill_diagonal_(float("-inf"))
        same = (labels[:, None, :] == labels[None, :, :]).all(-1)
        nn_same = same[torch.arange(len(z)), sim.argmax(1)].float().mean().item()
        same.fill_diagonal_(False)
        chance = same.float().sum().item() / (len(z) * (len(z) - 1))
        zn = F.normalize(z, dim=-1)
        n = zn.shape[0]
        cos = (zn @ zn.T).sum().sub(n).div(n * (n - 1)).item()
        zc = z - z.mean(0)
        sv = torch.linalg.svdvals(zc)
        p = sv / sv.sum()
        erank = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
        pc1 = float(sv[0] ** 2 / (sv ** 2).sum())
        hn = torch.cat(hid_norms)
        print(f"stage1 s{s}: n={n} mean_cos={cos:.3f} eff_rank={erank:.1f}/{z.shape[1]} pc1_var={pc1:.3f} "
              f"pooled_norm={z.norm(dim=-1).mean():.2f} token_state_norm={hn.mean():.2f} "
              f"nn_same_labels={nn_same:.3f} (chance {chance:.3f}, {len(z)} studies)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["stage1", "stage2", "summary", "probe-stage1"])
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "seed_diagnosis")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--pairs", nargs="*", default=["2:2", "0:2", "2:0"])
    ap.add_argument("--tag", default="")
    ap.add_argument("extra", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    {"stage1": cmd_stage1, "stage2": cmd_stage2, "summary": cmd_summary, "probe-stage1": cmd_probe_stage1}[args.command](args)


if __name__ == "__main__":
    main()
