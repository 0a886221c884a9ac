"""Privacy-utility frontier of issue #31 item 2: which DP variant moves which re-linkage risk, at what utility.

Arms (one seed each; each arm's result is kept as experiments/results/frontier/<arm>.json, so a rerun skips
finished arms -- resumable run by run):

* ``public_init``: stage 2 trained on the public cohort only (synthcxr_external), the start of every whole-model
  arm (from a random init the public-negatives loss collapsed the towers); what an attacker has without the release;
* ``control``: the non-private control -- `experiment=dp_whole model.dp.enabled=false`: the same towers, loss
  (public negatives), per-patient Poisson schedule and optimizer, without clipping or noise;
* ``head_dp_eps{E}``: head-only DP (`experiment=dp_alignment`, patient units, fresh heads) on the control's
  trunk: the trunk saw the private patients without DP, as in the reproduction's claim 4;
* ``whole_dp_eps{E}``: whole-model DP-SGD (`experiment=dp_whole`, both towers + heads, patient units).

Per arm, on the released model's features (audit/ library calls, no Lightning):

* capability: image -> report R@1 at N = 100 of held-out (test) patients, patient-bootstrap CI;
* release-attributable and the best attack with the release: audit.risk.risk_audit (aux = the val split's
  pairs, disjoint from members and audited patients; no-release features: 8x8 pooled pixels and a hashed
  bag of report tokens), ``--draws`` aux draws;
* memorisation: audit.risk.memorisation via risk_audit (members = train patients, non-members = test patients,
  equal pools), best attack's member - non-member R@1 difference with a two-sample patient bootstrap CI;
* matched-probe AUROC: one protocol for every arm, the reproduction's claim-4 one: a linear probe fitted on the
  public cohort's train split (synthcxr_external; no DP unit), scored on the private test split.

    python -m experiments.frontier                     # the small run (scale below), resumable
    python -m experiments.frontier --arms control whole_dp_eps3 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "experiments" / "results" / "frontier"
EPSILONS = (1, 3, 8)
PROBE_PROTOCOL = ("linear probe fitted on the public cohort's train split (synthcxr_external: no DP unit, the same "
                  "images for every arm), scored on the private test split")


def arm_names(epsilons=EPSILONS) -> list[str]:
    return ["public_init", "control", *[f"head_dp_eps{e:g}" for e in epsilons], *[f"whole_dp_eps{e:g}" for e in epsilons]]


def cohort_overrides(a) -> list[str]:
    """The private cohort (synthcxr, scaled down) and the public one at the same image size."""
    return [f"data.reader.num_patients={a.patients}", f"data.reader.image_size={a.image_size}",
            f"data.image_size={a.image_size}", f"seed={a.seed}"]


def train_command(arm: str, a, work: Path) -> list[str]:
    base = [sys.executable, str(ROOT / "train.py"), *cohort_overrides(a), "logger=csv", "final_audit=false",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"hydra.run.dir={work / arm}"]
    init = work / "public_init" / "checkpoints" / "last.ckpt"
    if arm == "public_init":  # stage 2 on the public cohort only: every whole-model arm starts from it
        return [sys.executable, str(ROOT / "train.py"), "data=synthcxr_external",
                f"data.reader.num_patients={a.public_patients}", f"data.reader.image_size={a.image_size}",
                f"data.image_size={a.image_size}", f"seed={a.seed}", f"trainer.max_epochs={a.public_epochs}",
                "logger=csv", "final_audit=false", "callbacks=none", "trainer.limit_val_batches=0",
                "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                f"+callbacks.last.dirpath={work / arm / 'checkpoints'}", "+callbacks.last.filename=last",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"hydra.run.dir={work / arm}"]
    if arm == "control" or arm.startswith("whole_dp"):
        ov = ["experiment=dp_whole", f"model.init_ckpt={init}", f"trainer.max_epochs={a.epochs}", f"data.batch_size={a.batch}",
              f"model.dp_optimizer.lr={a.lr}", f"public_cohort.reader.num_patients={a.public_patients}"]
        ov += ["model.dp.enabled=false"] if arm == "control" else [f"model.dp.target_epsilon={arm.split('eps')[1]}"]
        return base + ov
    if arm.startswith("head_dp"):
        return base + ["experiment=dp_alignment", f"model.backbone_ckpt={work / 'control' / 'checkpoints' / 'last.ckpt'}",
                       "data.privacy_unit=patient", f"model.dp.target_epsilon={arm.split('eps')[1]}",
                       f"public_cohort.reader.num_patients={a.public_patients}", f"trainer.max_epochs={a.head_epochs}",
                       f"data.batch_size={a.head_batch}"]
    raise ValueError(f"unknown arm {arm!r}; expected one of {arm_names()}")


def train_arm(arm: str, a, work: Path) -> tuple[Path, float]:
    """Train (unless its checkpoint exists) and return (checkpoint, CPU seconds of the training process)."""
    ckpt = work / arm / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt, 0.0
    if arm.startswith("head_dp"):
        train_arm("control", a, work)  # its backbone
    elif arm != "public_init":
        train_arm("public_init", a, work)  # the public starting point
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = train_command(arm, a, work)
    print(f"[frontier] {arm}: {' '.join(cmd[1:])}", flush=True)
    log = (work / f"{arm}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0 or not ckpt.exists():
        raise RuntimeError(f"{arm}: training failed (exit {rc}); see {log}")
    return ckpt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# ------------------------------------------------------------------------------------------- features
def _datamodule(overrides: list[str], tokenizer):
    from hydra.utils import instantiate

    from cxr_relink.configs import compose

    cfg = compose("train.yaml", overrides)
    dm = instantiate(cfg.data)
    dm.tokenizer = tokenizer  # the released model's own
    dm.setup("fit")
    return dm


def paired(model, dm, split: str, name: str, prefix: str, cap_items: int | None = None):
    """(released PairedFeatures, release-free PairedFeatures, item labels, item patient ids) of one split."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cxr_relink.audit.adaptive import PairedFeatures
    from cxr_relink.audit.probe import subsample_rows

    n = len(dm.dataset(split, train=False))
    loader = dm.eval_dataloader(split, indices=None if not cap_items or cap_items >= n else subsample_rows(n, cap_items, 0))
    it, ir, pix, lab, st, pat = [], [], [], [], [], []
    text = {}
    with torch.no_grad():
        for b in loader:
            img = b["image"]
            it.append(model.image_features(img).float())
            ir.append(model.encode_images(img).float())
            pix.append(F.adaptive_avg_pool2d(img.float(), 8).flatten(1))
            lab.append(b["labels"].float())
            st.append(b["study_idx"])
            pat.append(b["patient_idx"])
            new = [i for i, s in enumerate(b["study_idx"].tolist()) if s not in text]
            if new:
                ids, mask = b["input_ids"][new], b["attention_mask"][new]
                tt, tr = model.text_features(ids, mask).float(), model.encode_reports(ids, mask).float()
                bow = torch.zeros(len(new), 64)
                for r in range(len(new)):  # hashed bag of the report's tokens: release-free report features
                    bow[r].index_add_(0, ids[r][mask[r].bool()] % 64, torch.ones(int(mask[r].sum())))
                for r, i in enumerate(new):
                    text[int(b["study_idx"][i])] = (tt[r], tr[r], bow[r], int(b["patient_idx"][i]))
    studies = sorted(text)
    remap = {s: j for j, s in enumerate(studies)}
    item_study = torch.tensor([remap[int(s)] for s in torch.cat(st).tolist()])
    sp = np.array([f"{prefix}{text[s][3]}" for s in studies], dtype=object)
    item_labels = torch.cat(lab)
    study_labels = np.zeros((len(studies), item_labels.shape[1]), dtype=np.float32)
    study_labels[item_study.numpy()] = item_labels.numpy()
    rel = PairedFeatures(torch.cat(it), torch.stack([text[s][0] for s in studies]), torch.cat(ir),
                         torch.stack([text[s][1] for s in studies]), item_study, sp, study_labels, None, name)
    bow = torch.stack([text[s][2] for s in studies])
    p = torch.cat(pix)
    free = PairedFeatures(p, bow, p, bow, item_study, sp, study_labels, None, name + " (release-free)")
    return rel, free, item_labels, torch.cat(pat)


def evaluate_arm(arm: str, ckpt: Path, a) -> dict:
    import numpy as np
    import torch

    from cxr_relink.audit.probe import linear_probe
    from cxr_relink.audit.relinkage import Relinkage
    from cxr_relink.audit.risk import risk_audit
    from cxr_relink.models.checkpoint import load_module

    torch.manual_seed(a.seed)
    model = load_module(ckpt).eval()
    priv = _datamodule(["data=synthcxr", *cohort_overrides(a)], model.tokenizer)
    pub = _datamodule(["data=synthcxr_external", f"data.reader.num_patients={a.public_patients}",
                       f"data.reader.image_size={a.image_size}", f"data.image_size={a.image_size}"], model.tokenizer)
    test, test_free, test_y, test_pat = paired(model, priv, "test", "test", "p")
    val, val_free, _, _ = paired(model, priv, "val", "val", "p")
    train, _, _, _ = paired(model, priv, "train", "train", "p")
    pubf, _, pub_y, _ = paired(model, pub, "train", "public", "pub", cap_items=a.probe_train)
    # allow_degenerate: a collapsed DP arm is audited (and links at chance) instead of stopping the frontier
    relink = Relinkage(ks=[1], ns=[100, "full"], directions=["i2t"], hardneg=False, n_boot=a.n_boot,
                       allow_degenerate=True).audit
    risk = risk_audit(test, val, relink, no_release_target=test_free, no_release_aux=val_free, members=train,
                      nonmembers=test, n_aux=a.n_aux, n_draws=a.draws, n=100, seed=a.seed, n_boot=a.n_boot)
    probe = linear_probe(pubf.image_released, pub_y.numpy(), test.image_released, test_y.numpy(),
                         test_patient=test_pat.numpy(), n_boot=a.probe_boot, seed=a.seed)
    ra = risk["release_attributable"]
    draws = ra["draws"]
    best_with = max(draws[0]["attacks"]["with"], key=lambda k: np.mean([d["attacks"]["with"][k] for d in draws]))
    dp = getattr(model, "saved_dp_state", None) or {}
    return {
        "arm": arm, "checkpoint": str(ckpt),
        "privacy": {k: dp.get(k) for k in ("enabled", "guarantee_valid", "epsilon_spent", "target_epsilon", "delta",
                                            "noise_multiplier", "sample_rate", "steps_planned", "privacy_unit",
                                            "dp_scope", "loss_mode", "max_grad_norm")},
        "capability": risk["capability"],
        "best_attack_with_release": {"attack": best_with,
                                     "mean_over_draws": float(np.mean([d["attacks"]["with"][best_with] for d in draws])),
                                     "per_draw": [d["attacks"]["with"][best_with] for d in draws],
                                     "selected_on_audited_split": True},
        "release_attributable": {k: v for k, v in ra.items() if k != "draws"} | {"draws": draws},
        "memorisation": risk["memorisation"],
        "probe": {"macro_auroc": probe["macro_auroc"], "macro_auroc_ci": probe.get("macro_auroc_ci"),
                  "protocol": PROBE_PROTOCOL},
        "n": {"test_studies": test.n_studies, "val_studies": val.n_studies, "train_studies": train.n_studies,
              "public_probe_items": pubf.n_items},
    }


# ---------------------------------------------------------------------------------------------- report
def _pct(v, ci=None) -> str:
    if v is None:
        return "—"
    s = f"{100 * v:.1f}"
    return s + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def table(results: dict[str, dict], a) -> str:
    L = ["| arm | ε (spent) | capability R@1 N=100 | best attack with release (mean over draws) | "
         "release-attributable | memorisation (members − held-out, best attack) | matched-probe macro AUROC | CPU min |",
         "|---|---|---|---|---|---|---|---:|"]
    for arm in arm_names(a.epsilons):
        r = results.get(arm)
        if r is None:
            L.append(f"| {arm} | not run | | | | | | |")
            continue
        p = r["privacy"]
        eps = ("— (no private data)" if arm == "public_init" else "∞ (no DP)") if not p.get("enabled") else f"{p['epsilon_spent']:.3g}" + ("" if p.get("guarantee_valid") else " INVALID")
        c, b, ra, m, pr = r["capability"], r["best_attack_with_release"], r["release_attributable"], r["memorisation"]["best"], r["probe"]
        L.append(f"| {arm} | {eps} | {_pct(c['value'], c.get('ci'))} | {_pct(b['mean_over_draws'])} ({b['attack']}) | "
                 f"{_pct(ra['value'], ra.get('ci'))} | {_pct(m['difference'], m['difference_ci'])} ({m['attack']}) | "
                 f"{_pct(pr['macro_auroc'], pr.get('macro_auroc_ci'))} | {r['cpu_s'] / 60:.1f} |")
    return "\n".join(L)


def plot(results: dict[str, dict], a, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("capability R@1 N=100 (%)", lambda r: r["capability"]["value"]),
               ("best attack with release (%)", lambda r: r["best_attack_with_release"]["mean_over_draws"]),
               ("memorisation: members − held-out (points)", lambda r: r["memorisation"]["best"]["difference"]),
               ("matched-probe macro AUROC (%)", lambda r: r["probe"]["macro_auroc"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    xs = list(a.epsilons) + [30]
    for ax, (title, get) in zip(axes, metrics):
        for fam, color in (("whole_dp", "C0"), ("head_dp", "C1")):
            pts = [(e, 100 * get(results[f"{fam}_eps{e:g}"])) for e in a.epsilons if f"{fam}_eps{e:g}" in results]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=fam.replace("_", "-"))
        if "control" in results:
            ax.axhline(100 * get(results["control"]), color="k", ls="--", lw=1, label="non-private control")
        if "public_init" in results:
            ax.axhline(100 * get(results["public_init"]), color="0.5", ls=":", lw=1, label="public-only start")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(a.epsilons))
        ax.set_xticklabels([f"{e:g}" for e in a.epsilons])
        ax.set_xlabel("ε (per patient)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"privacy-utility frontier (synthcxr, {a.patients} patients, {a.image_size}px, seed {a.seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="*", default=None, help="default: every arm")
    ap.add_argument("--epsilons", nargs="*", type=float, default=list(EPSILONS))
    ap.add_argument("--patients", type=int, default=600, help="private synthcxr patients (70%% train)")
    ap.add_argument("--public-patients", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="expected Poisson batch of patients (whole-model arms)")
    ap.add_argument("--lr", type=float, default=2e-4, help="Adam; 2e-3 collapsed the public start within 4 steps")
    ap.add_argument("--head-epochs", type=int, default=20)
    ap.add_argument("--public-epochs", type=int, default=6, help="stage 2 on the public cohort (the starting point)")
    ap.add_argument("--head-batch", type=int, default=128)
    ap.add_argument("--draws", type=int, default=5, help="auxiliary draws per arm (issue #31: at least 5)")
    ap.add_argument("--n-aux", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--probe-boot", type=int, default=100)
    ap.add_argument("--probe-train", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("CXR_RELINK_CACHE", ROOT / "outputs")) / "frontier_runs")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    a.epsilons = [int(e) if float(e).is_integer() else e for e in a.epsilons]
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in a.arms or arm_names(a.epsilons):
        f = a.out / f"{arm}.json"
        if f.exists():
            results[arm] = json.loads(f.read_text())
            print(f"[frontier] {arm}: kept ({f.name})", flush=True)
            continue
        t0, c0 = time.time(), time.process_time()
        ckpt, train_cpu = train_arm(arm, a, a.work)
        res = evaluate_arm(arm, ckpt, a)
        res["cpu_s"] = train_cpu + (time.process_time() - c0)
        res["cpu_s_train"], res["wall_s"] = train_cpu, time.time() - t0
        res["scale"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("arms", "out", "work")}
        f.write_text(json.dumps(res, indent=1, default=float))
        results[arm] = res
        print(f"[frontier] {arm}: done, {res['cpu_s'] / 60:.1f} CPU min", flush=True)
    for arm in arm_names(a.epsilons):
        if arm not in results and (a.out / f"{arm}.json").exists():
            results[arm] = json.loads((a.out / f"{arm}.json").read_text())
    md = table(results, a)
    cpu = sum(r.get("cpu_s", 0.0) for r in results.values())
    head = (f"# Privacy-utility frontier (issue #31 item 2)\n\nScale: synthcxr {a.patients} patients (70% train: the DP "
            f"units, patient level), {a.image_size} px, bert_encoder towers (tiny), seed {a.seed}; public cohort synthcxr_external "
            f"{a.public_patients} patients. Whole-model arms: {a.epochs} epochs, expected batch {a.batch} patients, Adam {a.lr:g}, "
            f"from `public_init`; head-only arms: {a.head_epochs} epochs on the control's trunk. R@1 image -> report at N = 100 "
            f"on the test split (%), patient-bootstrap 95% CI; release-attributable and the best attack: {a.draws} aux draws of "
            f"{a.n_aux} val studies; memorisation: train vs test patients, equal pools. Probe: {PROBE_PROTOCOL}. "
            f"Total CPU time of these arms: {cpu / 60:.1f} min (per arm in the last column: training subprocess + evaluation; "
            f"a kept arm keeps its own).\n\n")
    (a.out / "frontier.md").write_text(head + md + "\n")
    plot(results, a, a.out / "frontier.png")
    print(md)


if __name__ == "__main__":
    main()
