"""Results table of the DP stage: before DP / non-private head finetune / DP at several epsilons.

    python bench/dp_results.py --ckpt <stage-2 checkpoint> [--epochs 20] [--eps 0.34,1,3,8]
                               [--modes public_negatives,group_clipping] [--seed-repro] [--out DIR]

For every run: R@1 at N = 100, 1,000, 10,000 (pools larger than the split are clipped to the full
split, marked "full (M)"), pathology-matched hard-negative R@1 at N = 100 (effective pool reported by
the audit), linear-probe macro AUROC, each with a 95% bootstrap-over-patients CI, on the internal test
split and on synthcxr_external's test split without retraining (the external cohort's *train* split
is the public negative bank, its test split is never seen). Plus the member vs non-member linkage
test (train vs test queries against the val split's reports) with the e^eps bound.

Config-driven: the cohorts, batch size, bank, clipping norm, accountant... come from
`experiment=dp_alignment` (configs/experiment/dp_alignment.yaml); extra Hydra overrides can be
passed after `--`. Writes dp_results.md and dp_results.json into --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CXR_RELINK_ROOT", str(ROOT))
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from callbacks.metrics import EmbeddingSet, relinkage_audit  # noqa: E402
from callbacks.probe import linear_probe  # noqa: E402
from models.dp.features import InMemoryFeatureDataModule  # noqa: E402
from models.dp.membership import embed_items, membership_test_from_features  # noqa: E402
from models.dp.module import DPAlignmentModule  # noqa: E402

log = logging.getLogger("dp_results")


def compose_cfg(ckpt: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train.yaml", overrides=["experiment=dp_alignment", f"model.backbone_ckpt={ckpt}", *overrides])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "logs" / "dp_results")
    return cfg


def evaluate(module, feats: dict, n_boot: int, seed: int = 0, probe_cap: int = 2000) -> dict[str, object]:
    """Re-linkage (i2t, hard negatives) on the test split and the linear probe (train -> test)."""
    test = feats["test"]
    img, _ = embed_items(module, test)
    _, rep = embed_items(module, {**test, "item_study": torch.arange(test["text"].shape[0])})
    es = EmbeddingSet(img, rep, test["item_study"], test["study_patient"], test["labels"].numpy())
    rel = relinkage_audit(es, ks=(1,), ns=(100, 1000, 10000, "full"), directions=("i2t",), hardneg=True, n_boot=n_boot, seed=seed)
    out: dict[str, object] = {"n_test_studies": es.n_studies, "n_test_items": es.n_items}
    for row in rel["i2t"]["recall"]:
        out[f"R@1/N={row['n']}"] = (row["value"], row.get("ci"), row["n_value"])
    hn = {r["n"]: r for r in rel["hardneg/i2t"]["recall"]}
    row = hn.get("100") or hn.get("full")
    out["hardneg R@1"] = (row["value"], row.get("ci"), row["effective_pool_mean"])
    tr = feats["train"]
    idx = torch.randperm(tr["image"].shape[0], generator=torch.Generator().manual_seed(seed))[:probe_cap]
    xtr, _ = embed_items(module, {**tr, "image": tr["image"][idx], "item_study": tr["item_study"][idx]})
    ytr = tr["labels"][tr["item_study"][idx]].numpy()
    probe = linear_probe(xtr, ytr, img, test["labels"][test["item_study"]].numpy(),
                         test_patient=test["study_patient"][test["item_study"]].numpy(), n_boot=n_boot, seed=seed)
    out["macro AUROC"] = (probe["macro_auroc"], probe.get("macro_auroc_ci"), None)
    return out


def train_heads(ckpt: str, cfg, feats, public, mode: str, dp_enabled: bool, eps: float | None, epochs: int, seed: int):
    L.seed_everything(seed, verbose=False)
    m = cfg.model
    loss = {**OmegaConf.to_container(m.loss), "mode": mode}
    dp = {**OmegaConf.to_container(m.dp), "enabled": dp_enabled}
    if eps is not None:
        dp["target_epsilon"] = float(eps)
    module = DPAlignmentModule(backbone_ckpt=ckpt, loss=loss, dp=dp, optimizer=OmegaConf.to_container(m.optimizer))
    if epochs > 0:
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        dm = InMemoryFeatureDataModule(feats, public, batch_size=int(cfg.data.batch_size), privacy_unit=str(cfg.data.privacy_unit))
        trainer.fit(module, datamodule=dm)
    return module


def fmt(v) -> str:
    if v is None:
        return "–"
    val, ci, _ = v
    s = f"{100 * val:.1f}"
    if ci:
        s += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="stage-2 dual-tower checkpoint")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--eps", default="0.34,1,3,8")
    ap.add_argument("--modes", default="public_negatives,group_clipping")
    ap.add_argument("--seed-repro", action="store_true", help="also run in_batch (the seed's method; NO valid epsilon)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "logs" / "dp_results"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "models.dp.module"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.time()
    cfg = compose_cfg(args.ckpt, args.overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    feats, public = dm.features, dm.public
    ext = instantiate(cfg.data, reader=cfg.public_cohort.reader, public_reader=None)
    ext.setup("fit")
    print(f"features ready in {time.time() - t0:.0f} s: internal {[feats[s]['text'].shape[0] for s in ('train', 'val', 'test')]} "
          f"studies (train/val/test), public bank {public[0].shape[0]}, external test {ext.features['test']['text'].shape[0]}", flush=True)
    delta = cfg.model.dp.target_delta
    runs = [("before DP (stage-2 heads)", "public_negatives", False, None, 0)]
    modes = args.modes.split(",")
    runs += [(f"non-private finetune", mode, False, None, args.epochs) for mode in modes]
    runs += [(f"DP eps={e}", mode, True, float(e), args.epochs) for mode in modes for e in args.eps.split(",")]
    if args.seed_repro:
        runs += [(f"seed repro eps={e} (NO valid eps)", "in_batch", True, float(e), args.epochs) for e in args.eps.split(",")[:1]]
    results = []
    for name, mode, dp_on, eps, epochs in runs:
        t = time.time()
        module = train_heads(args.ckpt, cfg, feats, public, mode, dp_on, eps, epochs, int(cfg.seed))
        spent = module.epsilon_spent() if dp_on else None
        d = module.delta if module.delta is not None else (float(delta) if delta is not None else 1.0 / (10 * dm.n_train_units))
        internal = evaluate(module, feats, args.n_boot)
        external = evaluate(module, ext.features, args.n_boot)
        member = membership_test_from_features(module, feats, spent if (dp_on and module.guarantee_valid) else None, d,
                                               ks=(1,), ns=(100,), n_boot=args.n_boot)
        results.append({"run": name, "mode": mode if epochs else "-", "dp": dp_on, "epsilon_spent": spent, "delta": d,
                        "sigma": module.noise_multiplier, "valid": module.guarantee_valid if dp_on else None,
                        "internal": internal, "external": external, "membership": member["rows"][0], "seconds": time.time() - t})
        print(f"{name} / {mode}: eps {spent}, internal R@1@100 {fmt(internal.get('R@1/N=100') or internal.get('R@1/N=full'))} "
              f"({time.time() - t:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_results.json").write_text(json.dumps(results, indent=1, default=str))
    md = render(results, args, cfg, time.time() - t0)
    (out / "dp_results.md").write_text(md)
    print(md)


def render(results, args, cfg, seconds) -> str:
    lines = [f"Stage-2 checkpoint `{args.ckpt}`; {args.epochs} epochs of head training on cached features; "
             f"expected batch {cfg.data.batch_size}, C = {cfg.model.dp.max_grad_norm}, accountant {cfg.model.dp.accountant}, "
             f"privacy unit {cfg.data.privacy_unit}; 95% CIs by bootstrap over patients ({args.n_boot}); values in %. "
             f"Total {seconds / 60:.1f} min.", ""]
    for split_name, key in (("internal test (synthcxr)", "internal"), ("external test (synthcxr_external, no retraining)", "external")):
        r0 = results[0][key]
        ncols = [k for k in r0 if k.startswith("R@1/N=")]
        heads = [f"R@1 N={k.split('=')[1]}" + (f" ({r0[k][2]})" if k.endswith("full") else "") for k in ncols]
        lines.append(f"**{split_name}** — {r0['n_test_studies']} studies, {r0['n_test_items']} image queries")
        lines.append("")
        lines.append("| run | loss | ε spent (δ) | σ | " + " | ".join(heads) + " | hard-neg R@1 | macro AUROC |")
        lines.append("|---|---|---|---|" + "---|" * (len(heads) + 2))
        for r in results:
            e = "–" if r["epsilon_spent"] is None else (f"{r['epsilon_spent']:.3f} ({r['delta']:.1e})" + ("" if r["valid"] else " **INVALID**"))
            s = "–" if r["sigma"] is None else f"{r['sigma']:.3f}"
            vals = [fmt(r[key][k]) for k in ncols] + [fmt(r[key]["hardneg R@1"]), fmt(r[key]["macro AUROC"])]
            lines.append(f"| {r['run']} | {r['mode']} | {e} | {s} | " + " | ".join(vals) + " |")
        lines.append("")
    lines.append("**member vs non-member linkage** (R@1 at N = 100 against the val split's reports; members = train queries, "
                 "non-members = test queries; bound = e^ε·non-member + δ)")
    lines.append("")
    lines.append("| run | loss | member | non-member | bound | holds? |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        m = r["membership"]
        mem = f"{100 * m['member']:.1f} [{100 * m['member_ci'][0]:.1f}, {100 * m['member_ci'][1]:.1f}]"
        non = f"{100 * m['nonmember']:.1f} [{100 * m['nonmember_ci'][0]:.1f}, {100 * m['nonmember_ci'][1]:.1f}]"
        bound = ("≥ 100 (vacuous)" if m["bound"] >= 1 else f"{100 * m['bound']:.1f}") if "bound" in m else "–"
        holds = ("yes" if m["holds"] else ("no (significant)" if m["violated_significantly"] else "no (within CI)")) if "holds" in m else "no claim"
        lines.append(f"| {r['run']} | {r['mode']} | {mem} | {non} | {bound} | {holds} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
