"""Results table of the DP stage for both protocols: before DP / non-private head finetune / DP at several epsilons.

    python -m experiments.dp_results --ckpt <stage 2 on the private cohort> [--public-ckpt <stage 2 on the public cohort>]
                               [--epochs 20] [--eps 0.34,1,3,8] [--modes public_negatives,group_clipping]
                               [--seed-repro] [--privacy-unit study|patient] [--probe-train public|private]
                               [--head-init fresh|stage2] [--protocols paper,valid] [--out DIR] [-- hydra overrides]
    python -m experiments.dp_results --optim-sweep --ckpt <stage 2> [--sweep-grid 'sgd:0.01,0.1;adam:1e-3,1e-2']
                               [--sweep-eps 0.34] [--repeats 2] [--out DIR]     # the DP optimizer sweep (optim_sweep)

Two protocols, each with its own frozen backbone, its own cached features and its own rows:

* ``paper`` (``--ckpt``): stage 2 trained on the private cohort -- the same studies stage 3 protects
  (the first paper's protocol). Epsilon covers stage 3 only: the stage-2 encoders saw the private
  training units with no DP, so no end-to-end epsilon exists for the released model.
* ``valid`` (``--public-ckpt``): stage 2 trained on the public cohort (``synthcxr_external``), stage 3
  on the private one. Epsilon then covers the released model end to end. Without ``--public-ckpt``
  the script trains that checkpoint itself (``train.yaml`` with ``data=synthcxr_external logger=csv``,
  output in ``logs/dp_results/stage2_public``), or reuses the one already there.

Privacy unit: the paper protocol keeps the experiment config's ``data.privacy_unit`` (study); the
valid protocol uses ``patient`` by default (with study units a patient with k studies is protected only at
(k eps, k e^{(k-1) eps} delta), ``models.dp.accounting.group_privacy``).
``--privacy-unit`` sets the unit of both.

For every run: R@1 at N = 100, 1,000, 10,000 (pools larger than the split are clipped to the full
split, marked "full (M)"), pathology-matched hard-negative R@1 at N = 100 (effective pool reported by
the audit), linear-probe macro AUROC, each with a 95% bootstrap-over-patients CI, on the internal test
split and on synthcxr_external's test split without retraining. The linear probe is fitted on the
public cohort's train split by default (``--probe-train public``: no release about the DP training
units; ``private`` fits it on the private train split, a non-private measurement about them).

Member vs non-member linkage test (audit/membership.py) for the stage-2 model alone ("before
DP") and for every stage-3 run of each protocol: train vs test queries against the val split's
reports. The e^eps bound is drawn only where a valid end-to-end epsilon applies: the valid
protocol's DP runs (and its stage-2 model, which never saw the private cohort: eps = 0 w.r.t. it).
With ``study`` units the members' patients contribute all their studies while non-members' patients
contribute none, so the bound is the group-privacy one (k = the most studies of one train patient).

DP noise and Poisson batches are secret (OS entropy, models/dp/module.py): two runs of this command
give different DP rows. Each run's ``dp_state()`` is saved in the JSON (guarantee_valid, noise_source...).

Config-driven: the cohorts, batch size, bank, clipping norm, accountant... come from
`experiment=dp_alignment` (configs/experiment/dp_alignment.yaml); extra Hydra overrides can be
passed after `--` (they apply to both protocols). Writes dp_results.md and dp_results.json into --out
and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from cxr_relink.configs import ROOT  # also sets CXR_RELINK_ROOT

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from cxr_relink.audit.embeddings import EmbeddingSet  # noqa: E402
from cxr_relink.audit.membership import embed_items, membership_test_from_features  # noqa: E402
from cxr_relink.audit.probe import linear_probe  # noqa: E402
from cxr_relink.audit.relinkage import relinkage_audit  # noqa: E402
from bench.machine import describe  # noqa: E402
from cxr_relink.models.dp import record  # noqa: E402
from cxr_relink.models.dp.accounting import group_privacy  # noqa: E402
from cxr_relink.models.dp.features import PRIVACY_UNITS, InMemoryFeatureDataModule, file_sha256, pool_units  # noqa: E402
from cxr_relink.models.dp.module import HEAD_INITS, DPAlignmentModule  # noqa: E402

log = logging.getLogger("dp_results")

PROTOCOLS = {
    "paper": "stage 2 on the private cohort (paper protocol)",
    "valid": "stage 2 on the public cohort (end-to-end valid)",
}
STAGE2_PUBLIC_DIR = ROOT / "logs" / "dp_results" / "stage2_public"


def compose_cfg(ckpt: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train.yaml", overrides=["experiment=dp_alignment", f"model.backbone_ckpt={ckpt}", *overrides])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "logs" / "dp_results")
    return cfg


def public_stage2_checkpoint(out_dir: Path, overrides: list[str]) -> tuple[str, str]:
    """Stage 2 trained on the public cohort: reuse ``out_dir/checkpoints/last.ckpt`` or train it with
    the project's own config and ``train.train``. Returns (path, how it was obtained)."""
    ckpt = out_dir / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        print(f"valid protocol: reusing the public-cohort stage-2 checkpoint {ckpt} (delete it to retrain)", flush=True)
        return str(ckpt), f"reused {ckpt}"
    import train as train_script

    ov = ["data=synthcxr_external", "logger=csv", "task_name=stage2_public", *overrides]
    print(f"valid protocol: no --public-ckpt; training stage 2 on the public cohort (python train.py {' '.join(ov)}) "
          f"-> {out_dir}", flush=True)
    t = time.time()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train.yaml", overrides=ov)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    train_script.train(cfg)
    if not ckpt.exists():
        raise RuntimeError(f"stage-2 training finished without writing {ckpt}")
    print(f"valid protocol: stage 2 trained in {(time.time() - t) / 60:.1f} min -> {ckpt}", flush=True)
    return str(ckpt), f"trained by this script ({(time.time() - t) / 60:.1f} min): python train.py {' '.join(ov)}"


def evaluate(module, feats: dict, probe_train: dict, n_boot: int, seed: int = 0, probe_cap: int = 2000,
             split: str = "test", ns=(100, 1000, 10000, "full"), hardneg: bool = True) -> dict[str, object]:
    """Re-linkage (i2t, hard negatives) on ``split`` of ``feats`` and the linear probe
    (fitted on ``probe_train``'s images, scored on that split)."""
    test = feats[split]
    img, _ = embed_items(module, test)
    _, rep = embed_items(module, {**test, "item_study": torch.arange(test["text"].shape[0])})
    es = EmbeddingSet(img, rep, test["item_study"], test["study_patient"], test["labels"].numpy())
    rel = relinkage_audit(es, ks=(1,), ns=ns, directions=("i2t",), hardneg=hardneg, n_boot=n_boot, seed=seed)
    out: dict[str, object] = {"n_test_studies": es.n_studies, "n_test_items": es.n_items}
    for row in rel["i2t"]["recall"]:
        out[f"R@1/N={row['n']}"] = (row["value"], row.get("ci"), row["n_value"])
    if hardneg:
        hn = {r["n"]: r for r in rel["hardneg/i2t"]["recall"]}
        row = hn.get("100") or hn.get("full")
        out["hardneg R@1"] = (row["value"], row.get("ci"), row["effective_pool_mean"])
    tr = probe_train
    idx = torch.randperm(tr["image"].shape[0], generator=torch.Generator().manual_seed(seed))[:probe_cap]
    xtr, _ = embed_items(module, {**tr, "image": tr["image"][idx], "item_study": tr["item_study"][idx]})
    ytr = tr["labels"][tr["item_study"][idx]].numpy()
    probe = linear_probe(xtr, ytr, img, test["labels"][test["item_study"]].numpy(),
                         test_patient=test["study_patient"][test["item_study"]].numpy(), n_boot=n_boot, seed=seed)
    out["macro AUROC"] = (probe["macro_auroc"], probe.get("macro_auroc_ci"), None)
    return out


def train_heads(ckpt: str, cfg, feats, public, mode: str, dp_enabled: bool, eps: float | None, epochs: int, seed: int,
                privacy_unit: str, dp_extra: dict | None = None, batch_size: int | None = None, optimizer: dict | None = None):
    """One stage-3 run on cached features, as `experiment=dp_alignment` runs it (seeded from the public
    config seed; DP noise and batches stay secret unless ``dp_extra`` says otherwise). ``dp_extra`` may
    set ``head_init`` (fresh | stage2); ``optimizer`` replaces the config's optimizer."""
    L.seed_everything(seed, verbose=False)
    m = cfg.model
    loss = {**OmegaConf.to_container(m.loss), "mode": mode}
    dp = {**OmegaConf.to_container(m.dp, resolve=True), "enabled": dp_enabled, **(dp_extra or {})}
    if eps is not None:
        dp["target_epsilon"] = float(eps)
    module = DPAlignmentModule(backbone_ckpt=ckpt, loss=loss, dp=dp,
                               optimizer=optimizer or OmegaConf.to_container(m.optimizer))
    if epochs > 0:
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        dm = InMemoryFeatureDataModule(feats, public, batch_size=int(batch_size or cfg.data.batch_size), privacy_unit=privacy_unit)
        trainer.fit(module, datamodule=dm)
    return module


def dp_record(module) -> dict:
    """``dp_state()`` without the accountant's step-by-step history (its length is kept)."""
    st = dict(module.dp_state())
    acc = st.pop("accountant", None)
    st["accountant_steps"] = sum(int(n) for _, _, n in acc["history"]) if acc else None  # history entries are (sigma, q, count)
    return st


def eps_scope(protocol: str, run_kind: str, valid: bool | None) -> str:
    if run_kind == "before":
        return ("none: stage 2 trained on these units without DP" if protocol == "paper"
                else "0 w.r.t. the private cohort (stage 2 never saw it)")
    if run_kind == "nonprivate":
        return "none (no DP)"
    if not valid:
        return "none (no valid ε)"
    return "stage 3 only (stage 2 saw the units, no DP)" if protocol == "paper" else "end to end (released model)"


def run_protocol(protocol: str, ckpt: str, unit: str, args, overrides: list[str]) -> dict:
    t0 = time.time()
    cfg = compose_cfg(ckpt, [*overrides, f"data.privacy_unit={unit}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    feats, public = dm.features, dm.public
    ext = instantiate(cfg.data, reader=cfg.public_cohort.reader, public_reader=None)
    ext.setup("fit")
    if args.probe_train == "public":
        if "public" not in feats:
            raise ValueError("--probe-train public needs the public cohort's features (data.public_reader)")
        probe_train = feats["public"]
    else:
        probe_train = feats["train"]
    units = pool_units(feats["train"], unit)
    n_units = int(units["img"].shape[0])
    studies_per_patient = torch.bincount(torch.unique(feats["train"]["study_patient"], return_inverse=True)[1])
    k_max = int(studies_per_patient.max())
    cfg_delta = cfg.model.dp.target_delta
    print(f"[{protocol}] features ready in {time.time() - t0:.0f} s: internal "
          f"{[feats[s]['text'].shape[0] for s in ('train', 'val', 'test')]} studies (train/val/test), "
          f"{n_units} {unit} units, public bank {public[0].shape[0]}, external test {ext.features['test']['text'].shape[0]}",
          flush=True)
    modes = args.modes.split(",")
    epsilons = args.eps.split(",")
    runs = [("before DP (stage-2 heads)", "before", "public_negatives", False, None, 0)]
    runs += [("non-private finetune", "nonprivate", mode, False, None, args.epochs) for mode in modes]
    runs += [(f"DP ε={e}", "dp", mode, True, float(e), args.epochs) for mode in modes for e in epsilons]
    if args.seed_repro and protocol == "paper":
        runs += [(f"seed repro ε={e} (NO valid ε)", "dp", "in_batch", True, float(e), args.epochs) for e in epsilons[:1]]
    results = []
    for name, kind, mode, dp_on, eps, epochs in runs:
        t = time.time()
        # "before DP" is the stage-2 heads themselves; the other runs start from --head-init (default: the config's).
        init = "stage2" if kind == "before" else (args.head_init or str(cfg.model.dp.head_init))
        module = train_heads(ckpt, cfg, feats, public, mode, dp_on, eps, epochs, int(cfg.seed), unit, {"head_init": init})
        spent = module.epsilon_spent() if dp_on else None
        valid = bool(module.guarantee_valid) if dp_on else None
        d = module.delta if module.delta is not None else (float(cfg_delta) if cfg_delta is not None else 1.0 / (10 * n_units))
        internal = evaluate(module, feats, probe_train, args.n_boot)
        external = evaluate(module, ext.features, probe_train, args.n_boot)
        # The e^eps bound on member vs non-member linkage only where an end-to-end eps exists.
        if protocol == "valid" and kind == "before":
            bound_eps, bound_delta, bound_note = 0.0, 0.0, "ε = 0 (stage 2 never saw the private cohort)"
        elif protocol == "valid" and dp_on and valid:
            k = 1 if unit == "patient" else k_max
            bound_eps, bound_delta = group_privacy(spent, d, k)
            bound_note = f"ε = {spent:.3g} end to end" + ("" if k == 1 else f", study units: group bound k = {k} → {bound_eps:.3g}")
        else:
            bound_eps, bound_delta = None, d
            bound_note = ("no end-to-end ε: stage 2 saw the members without DP" if protocol == "paper"
                          else "no ε (no DP)" if not dp_on else "no valid ε")
        member = membership_test_from_features(module, feats, bound_eps, bound_delta, ks=(1,), ns=(100,), n_boot=args.n_boot)
        rec = {"protocol": protocol, "run": name, "kind": kind, "mode": mode if epochs else "-", "dp": dp_on, "head_init": init,
               "privacy_unit": unit, "n_train_units": n_units, "epsilon_spent": spent, "delta": d,
               "sigma": module.noise_multiplier, "sample_rate": module.sample_rate, "steps_planned": module.steps_planned,
               "valid": valid, "epsilon_scope": eps_scope(protocol, kind, valid),
               "guarantee_valid": valid, "noise_source": record.noise_source(module.hparams.dp) if dp_on else None,
               "dp_state": dp_record(module) if epochs else None,
               "internal": internal, "external": external,
               "membership": {**member["rows"][0], "bound_epsilon": bound_eps, "bound_delta": bound_delta, "bound_note": bound_note,
                              "n_members": member["n_members"], "n_nonmembers": member["n_nonmembers"],
                              "n_distractors": member["n_distractors"]},
               "seconds": time.time() - t}
        results.append(rec)
        print(f"[{protocol}] {name} / {rec['mode']}: eps {spent}, valid {valid}, internal R@1@100 "
              f"{fmt(internal.get('R@1/N=100') or internal.get('R@1/N=full'))} ({time.time() - t:.0f} s)", flush=True)
    meta = {"protocol": protocol, "description": PROTOCOLS[protocol], "ckpt": ckpt, "ckpt_sha256": file_sha256(ckpt),
            "privacy_unit": unit, "n_train_units": n_units, "max_studies_per_train_patient": k_max,
            "n_studies": {s: int(feats[s]["text"].shape[0]) for s in ("train", "val", "test")},
            "public_bank": int(public[0].shape[0]), "external_test_studies": int(ext.features["test"]["text"].shape[0]),
            "probe_train": (f"public cohort train split ({probe_train['image'].shape[0]} images, ≤ 2000 used)"
                            if args.probe_train == "public" else "private train split (DP training units; outside the guarantee)"),
            "batch_size": int(cfg.data.batch_size), "max_grad_norm": float(cfg.model.dp.max_grad_norm),
            "accountant": str(cfg.model.dp.accountant), "seconds": time.time() - t0}
    return {"meta": meta, "rows": results}


# --------------------------------------------------------------------------- the DP optimizer sweep
# SGD with momentum 0.9 (DP-SGD's usual form) and Adam, each at a few learning rates around where each
# moves the heads: Adam steps each weight by ~lr whatever the signal; SGD by lr x the noisy gradient.
DEFAULT_GRID = "sgd:0.003,0.01,0.03,0.3,3;adam:1e-4,1e-3,1e-2,3e-2,1e-1"
OPTIMIZERS = {"sgd": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9},
              "adam": {"_target_": "torch.optim.Adam", "_partial_": True}}
SELECT_METRIC = "R@1/N=100"


def parse_grid(text: str) -> list[tuple[str, float]]:
    grid = []
    for part in text.split(";"):
        name, _, lrs = part.partition(":")
        if name.strip() not in OPTIMIZERS or not lrs:
            raise SystemExit(f"--sweep-grid: expected 'name:lr,lr;...' with names {list(OPTIMIZERS)}, got {part!r}")
        grid += [(name.strip(), float(lr)) for lr in lrs.split(",")]
    return grid


def optimizer_cfg(name: str, lr: float) -> dict:
    return {**OPTIMIZERS[name], "lr": lr}


def optim_sweep(args) -> None:
    """DP optimizer sweep on cached features: fresh heads, paper protocol (``--ckpt``), epsilon ``--sweep-eps``.

    Every (optimizer, lr) of the grid is trained ``--repeats`` times (secret noise: each run differs) and
    scored on the val split (R@1 at N = 100, probe macro AUROC; point estimates); the setting with the
    highest mean val R@1 -- the one that fits the contrastive objective best under DP -- is chosen, and
    test-split numbers are reported for every setting (with CIs). Choosing the best-fitting optimizer,
    not the one with the lowest re-linkage, keeps a poorly trained optimizer from passing for privacy.
    Controls at the chosen setting: stage-2 init under DP, and the non-private runs (fresh and stage2;
    same schedule, no clipping or noise). One JSON line per run in ``--out``/optim_sweep.jsonl: a rerun
    skips the runs already there.
    """
    t0 = time.time()
    print(describe(), flush=True)
    cfg = compose_cfg(args.ckpt, args.overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    feats, public = dm.features, dm.public
    if "public" not in feats:
        raise ValueError("the optimizer sweep fits the probe on the public cohort: data.public_reader must be set")
    unit = args.privacy_unit or str(cfg.data.privacy_unit)
    mode = args.modes.split(",")[0]
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "optim_sweep.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
        print(f"resuming: {len(done)} runs already in {path}", flush=True)
    setup = {"ckpt_sha256": file_sha256(args.ckpt), "epochs": args.epochs, "eps": args.sweep_eps, "mode": mode, "unit": unit}

    def run(key: str, opt: str, lr: float, dp_on: bool, head_init: str, epochs: int) -> dict:
        key = json.dumps({**setup, "run": key}, sort_keys=True)
        if key in done:
            return done[key]
        t = time.time()
        module = train_heads(args.ckpt, cfg, feats, public, mode, dp_on, args.sweep_eps if dp_on else None, epochs,
                             int(cfg.seed), unit, {"head_init": head_init}, optimizer=optimizer_cfg(opt, lr))
        row = {"key": key, "optimizer": opt, "lr": lr, "dp": dp_on, "head_init": head_init, "epochs": epochs,
               "epsilon_spent": module.epsilon_spent() if dp_on else None, "sigma": module.noise_multiplier,
               "val": evaluate(module, feats, feats["public"], 0, split="val", ns=(100,), hardneg=False),
               "test": evaluate(module, feats, feats["public"], args.n_boot, split="test", ns=(100,), hardneg=False),
               "seconds": time.time() - t}
        with path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        done[key] = row
        print(f"{'DP' if dp_on else 'non-private'} {head_init} {opt} lr={lr:g}: val R@1 {fmt(row['val'][SELECT_METRIC])}, "
              f"test R@1 {fmt(row['test'][SELECT_METRIC])}, test AUROC {fmt(row['test']['macro AUROC'])} "
              f"({row['seconds']:.0f} s)", flush=True)
        return row

    before = run("before", "adam", 0.0, False, "stage2", 0)
    grid = parse_grid(args.sweep_grid)
    table = {(o, lr): [run(f"dp fresh {o} {lr} #{r}", o, lr, True, "fresh", args.epochs) for r in range(args.repeats)]
             for o, lr in grid}

    def mean(rows, split, metric):
        return sum(r[split][metric][0] for r in rows) / len(rows)

    best = max(table, key=lambda k: mean(table[k], "val", SELECT_METRIC))
    o, lr = best
    controls = {
        "fresh heads, untrained (0 steps)": [run("fresh untrained", o, lr, False, "fresh", 0)],
        "DP, stage-2 heads": [run(f"dp stage2 {o} {lr} #{r}", o, lr, True, "stage2", args.epochs) for r in range(args.repeats)],
        "DP, stage-2 heads, the previous default (adam 1e-3)": [
            run(f"dp stage2 adam 0.001 #{r}", "adam", 1e-3, True, "stage2", args.epochs) for r in range(args.repeats)],
        "non-private, fresh heads": [run(f"np fresh {o} {lr}", o, lr, False, "fresh", args.epochs)],
        "non-private, stage-2 heads": [run(f"np stage2 {o} {lr}", o, lr, False, "stage2", args.epochs)],
    }
    lines = [f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             f"{describe()}; {(time.time() - t0) / 60:.1f} min this invocation. Paper protocol, `{args.ckpt}` "
             f"(sha256 {setup['ckpt_sha256'][:12]}); loss {mode}, {unit} units, {args.epochs} epochs, DP ε = {args.sweep_eps} "
             f"(σ {table[best][0]['sigma']:.2f}); {args.repeats} DP runs per setting (secret noise). Val: point estimates "
             f"(mean of the runs, each run in brackets); test: mean, and each run with its 95% CI over patients "
             f"({args.n_boot} bootstrap replicates). Chosen on val R@1 at N = 100 (highest): **{o} lr={lr:g}**.", "",
             "| heads | optimizer | lr | val R@1 N=100 | val AUROC | test R@1 N=100 | test AUROC |", "|---|---|---|---|---|---|---|"]

    def line(label, opt, lr_, rows, mark=""):
        def cell(split, metric, with_ci):
            vals = [r[split][metric] for r in rows]
            each = ", ".join(fmt(v) if with_ci else f"{100 * v[0]:.1f}" for v in vals)
            return f"{100 * mean(rows, split, metric):.1f}" + (f" ({each})" if len(rows) > 1 or with_ci else "")
        return (f"| {label}{mark} | {opt} | {lr_} | {cell('val', SELECT_METRIC, False)} | {cell('val', 'macro AUROC', False)} | "
                f"{cell('test', SELECT_METRIC, True)} | {cell('test', 'macro AUROC', True)} |")

    lines.append(line("stage-2 heads, no stage 3", "–", "–", [before]))
    for (opt, lr_), rows in table.items():
        lines.append(line("DP, fresh", opt, f"{lr_:g}", rows, " **(chosen)**" if (opt, lr_) == best else ""))
    for label, rows in controls.items():
        lines.append(line(label, rows[0]["optimizer"], f"{rows[0]['lr']:g}", rows))
    md = "\n".join(lines) + "\n"
    (dest / "optim_sweep.md").write_text(md)
    print(md)


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
    ap.add_argument("--ckpt", required=True, help="stage-2 checkpoint trained on the private cohort (paper protocol)")
    ap.add_argument("--public-ckpt", default=None,
                    help="stage-2 checkpoint trained on the public cohort (valid protocol); default: train it / reuse "
                         f"{STAGE2_PUBLIC_DIR.relative_to(ROOT)}/checkpoints/last.ckpt")
    ap.add_argument("--stage2-override", action="append", default=[],
                    help="extra Hydra override for training the public stage 2 (repeatable; only without --public-ckpt)")
    ap.add_argument("--protocols", default="paper,valid")
    ap.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default=None,
                    help="unit of both protocols (default: the config's for paper, patient for valid)")
    ap.add_argument("--probe-train", choices=("public", "private"), default="public",
                    help="where the linear probe is fitted (public cohort's train split, or the private train split)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--eps", default="0.34,1,3,8")
    ap.add_argument("--modes", default="public_negatives,group_clipping")
    ap.add_argument("--seed-repro", action="store_true", help="paper protocol: also run in_batch (arXiv 2606.02276's method; NO valid epsilon)")
    ap.add_argument("--head-init", choices=HEAD_INITS, default=None,
                    help="heads stage 3 starts from (default: the config's model.dp.head_init); 'before DP' is always stage2")
    ap.add_argument("--optim-sweep", action="store_true",
                    help="instead of the tables: the DP optimizer sweep (paper protocol, fresh heads, --sweep-eps); resumable")
    ap.add_argument("--sweep-grid", default=DEFAULT_GRID, help="optimizer grid: 'sgd:<lr>,<lr>;adam:<lr>,...' (SGD with momentum 0.9)")
    ap.add_argument("--sweep-eps", type=float, default=0.34)
    ap.add_argument("--repeats", type=int, default=2, help="optimizer sweep: DP runs per setting (secret noise: they differ)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "logs" / "dp_results"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "cxr_relink.models.dp.module"):
        logging.getLogger(name).setLevel(logging.ERROR)
    protocols = args.protocols.split(",")
    for p in protocols:
        if p not in PROTOCOLS:
            raise SystemExit(f"--protocols: unknown protocol {p!r}; expected a subset of {list(PROTOCOLS)}")
    if args.optim_sweep:
        optim_sweep(args)
        return
    t0 = time.time()
    machine = describe()
    print(machine, flush=True)
    config_unit = str(compose_cfg(args.ckpt, args.overrides).data.privacy_unit)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine, "epochs": args.epochs,
           "n_boot": args.n_boot, "threads": args.threads, "probe_train": args.probe_train, "protocols": {}}
    stage2_note = None
    for p in protocols:
        if p == "paper":
            ckpt, unit = args.ckpt, args.privacy_unit or config_unit
        else:
            if args.public_ckpt:
                ckpt, stage2_note = args.public_ckpt, "given (--public-ckpt)"
            else:
                ckpt, stage2_note = public_stage2_checkpoint(STAGE2_PUBLIC_DIR, args.stage2_override)
            unit = args.privacy_unit or "patient"
        res = run_protocol(p, ckpt, unit, args, args.overrides)
        if p == "valid":
            res["meta"]["ckpt_origin"] = stage2_note
        out["protocols"][p] = res
    out["seconds"] = time.time() - t0
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dp_results.json").write_text(json.dumps(out, indent=1, default=str))
    md = render(out)
    (dest / "dp_results.md").write_text(md)
    print(md)


def render(out: dict) -> str:
    prots = out["protocols"]
    rows = [r for p in prots.values() for r in p["rows"]]
    lines = [f"`{out['command']}`", "", f"Machine: {out['machine']}. Total {out['seconds'] / 60:.1f} min.", ""]
    for p in prots.values():
        m = p["meta"]
        lines.append(f"- **{m['protocol']}** — {m['description']}: `{m['ckpt']}` (sha256 {m['ckpt_sha256'][:12]}"
                     + (f"; {m['ckpt_origin']}" if m.get("ckpt_origin") else "") + f"); privacy unit **{m['privacy_unit']}** "
                     f"(N = {m['n_train_units']} train units, at most {m['max_studies_per_train_patient']} studies per patient); "
                     f"expected batch {m['batch_size']}, C = {m['max_grad_norm']}, accountant {m['accountant']}; "
                     f"probe fitted on the {m['probe_train']}; {m['seconds'] / 60:.1f} min.")
    lines += ["", f"{out['epochs']} epochs of head training on cached features; 95% CIs by bootstrap over patients "
              f"({out['n_boot']}); values in %. DP noise and Poisson batches are **secret** (OS entropy, seeds kept nowhere): "
              "rerunning this command gives different DP rows (the non-private rows are seeded and repeat exactly). "
              "Outside every ε: audits of the val/test splits, and the member/non-member test (it reads the private train "
              "split again: a research measurement, not a release covered by the guarantee). Each DP row is its own release "
              "of the same units; publishing several rows composes their ε.", ""]
    r0 = rows[0]
    for split_name, key in (("internal test (synthcxr)", "internal"), ("external test (synthcxr_external, no retraining)", "external")):
        ncols = [k for k in r0[key] if k.startswith("R@1/N=")]
        heads = [f"R@1 N={k.split('=')[1]}" + (f" ({r0[key][k][2]})" if k.endswith("full") else "") for k in ncols]
        lines.append(f"**{split_name}** — {r0[key]['n_test_studies']} studies, {r0[key]['n_test_items']} image queries")
        lines.append("")
        lines.append("| protocol | run | loss | unit | ε spent (δ) | ε covers | σ | " + " | ".join(heads) + " | hard-neg R@1 | macro AUROC |")
        lines.append("|---|---|---|---|---|---|---|" + "---|" * (len(heads) + 2))
        for r in rows:
            e = "–" if r["epsilon_spent"] is None else (f"{r['epsilon_spent']:.3f} ({r['delta']:.1e})" + ("" if r["valid"] else " **INVALID**"))
            s = "–" if r["sigma"] is None else f"{r['sigma']:.3f}"
            vals = [fmt(r[key][k]) for k in ncols] + [fmt(r[key]["hardneg R@1"]), fmt(r[key]["macro AUROC"])]
            lines.append(f"| {r['protocol']} | {r['run']} | {r['mode']} | {r['privacy_unit']} | {e} | {r['epsilon_scope']} | {s} | "
                         + " | ".join(vals) + " |")
        lines.append("")
    lines.append("**member vs non-member linkage**, stage 2 alone (\"before DP\") and each stage-3 run (R@1 at N = 100 against "
                 "the val split's reports; members = private train queries, non-members = private test queries; "
                 "bound = e^ε·non-member + δ, only where an end-to-end ε applies)")
    lines.append("")
    lines.append("| protocol | model | loss | ε for this test | member | non-member | ratio | bound | holds? |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["membership"]
        mem = f"{100 * m['member']:.1f} [{100 * m['member_ci'][0]:.1f}, {100 * m['member_ci'][1]:.1f}]"
        non = f"{100 * m['nonmember']:.1f} [{100 * m['nonmember_ci'][0]:.1f}, {100 * m['nonmember_ci'][1]:.1f}]"
        ratio = "–" if m.get("ratio") is None else f"{m['ratio']:.2f}"
        bound = ("≥ 100 (vacuous)" if m["bound"] >= 1 else f"{100 * m['bound']:.1f}") if "bound" in m else "–"
        holds = ("yes" if m["holds"] else ("no (significant)" if m["violated_significantly"] else "no (within CI)")) if "holds" in m else "no claim"
        model = "stage 2 alone" if r["kind"] == "before" else f"stage 3: {r['run']}"
        lines.append(f"| {r['protocol']} | {model} | {r['mode']} | {m['bound_note']} | {mem} | {non} | {ratio} | {bound} | {holds} |")
    lines.append("")
    dp_rows = [r for r in rows if r["dp"]]
    if dp_rows:
        lines.append("DP runs' privacy state (`dp_state()`): " + "; ".join(
            f"{r['protocol']}/{r['mode']}/ε={r['dp_state']['target_epsilon']}: guarantee_valid={r['guarantee_valid']}, "
            f"q={r['sample_rate']:.4f}, steps={r['steps_planned']}" for r in dp_rows) + ". Noise source: "
            + "; ".join(sorted({str(r["noise_source"]) for r in dp_rows})) + ".")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
