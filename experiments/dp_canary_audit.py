"""Empirical privacy audit of the DP stage with one training run per setting (canaries).

    python -m experiments.dp_canary_audit --ckpt <stage-2 checkpoint> [--m 500] [--eps 0.34,1,3,8]
        [--modes public_negatives,group_clipping,in_batch] [--epochs 20] [--replay 100] [--out DIR]

The accountant's epsilon is an upper bound derived from the analysis; this script attacks the
released heads and converts what the attack achieves into a *lower* bound on epsilon (Steinke, Nasr
& Jagielski, arXiv 2305.08846; audit/one_run.py). A valid mode must never exceed its
nominal epsilon (beyond the stated 5% error probability); a lower bound above it proves that the
printed epsilon does not hold.

Per (loss mode, target epsilon, canary kind): m canary units, each added to the private training
units independently with probability 1/2 (auditor's randomness, seeded; the mechanism's noise and
batches are secret as always), one DP run as `experiment=dp_alignment` trains it (same module, same
Poisson sampling and accountant), then every canary is scored:
* ``relink`` (black box): how far the canary's own report stands out among the canary reports
  for its image, with the released heads (cos with its own minus mean cos with the others).
* ``whitebox``: alignment of the parameter change theta_T - theta_0 with minus the change the
  canary makes to the clipped gradient sum of a reference batch at theta_0 (for public_negatives
  that is exactly its clipped gradient; for in_batch it includes its effect on every other pair).
Both scores enter one Bonferroni family with the guess-count grid.

Canaries are crafted in the frozen-feature space the DP stage trains on (the strongest input an
adversary who controls a study's image and report can reach is some feature vector; crafting it
directly is the white-box worst case):
* ``random``: image and report features drawn at random with the norms of real features.
* ``hub`` (for in_batch): report features near the mean report feature (close to every image in
  the softmax denominators), plus a unique random part that identifies the canary.

Replay (``--replay R``): the adversary of flaw 1 knows the seed and every other record. With
``dp.INSECURE_replayable_seed`` set it retrains, for each of R canaries, with that canary in and
every other canary as it really was, and guesses "in" exactly when the retrain equals the release.
The same attack is run against secret noise. (A 400-unit subset and 2 epochs keep this cheap; the
attack does not depend on scale.)

Writes dp_canary_audit.json / .md into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

from cxr_relink.configs import ROOT  # also sets CXR_RELINK_ROOT

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.func import functional_call, jacrev  # noqa: E402

from cxr_relink.audit.one_run import audit_from_scores, epsilon_lower_bound  # noqa: E402
from bench.machine import describe  # noqa: E402
from experiments import dp_results  # noqa: E402
from cxr_relink.models.dp.features import pool_units, select_studies, stable_keys  # noqa: E402
from cxr_relink.models.dp.module import DPAlignmentModule  # noqa: E402

log = logging.getLogger("dp_canary_audit")


# --------------------------------------------------------------------------- canaries


def hub_feature(encode, others: torch.Tensor, dim: int, norm: float, steps: int = 300) -> torch.Tensor:
    """A feature whose embedding has the largest mean cosine with ``others`` (normalised embeddings):
    it sits high in every softmax denominator of the other modality (gradient ascent, any head)."""
    x = torch.randn(dim, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (-(encode(x[None]) @ others.T).mean()).backward()
        opt.step()
    return F.normalize(x.detach(), dim=0) * norm


def make_canaries(train: dict, m: int, kind: str, seed: int, module=None) -> dict:
    """m canary studies (one view each) in the feature space of ``train``."""
    g = torch.Generator().manual_seed(seed)
    img_norm = float(train["image"].norm(dim=1).mean())
    txt_norm = float(train["text"].norm(dim=1).mean())
    img = F.normalize(torch.randn(m, train["image"].shape[1], generator=g), dim=1) * img_norm
    txt = F.normalize(torch.randn(m, train["text"].shape[1], generator=g), dim=1) * txt_norm
    if kind == "hub":  # report near every image, image near every report, plus a unique part (0.3)
        with torch.no_grad():
            zi = module.encode_image_features(train["image"])
            zt = module.encode_report_features(train["text"])
        hub_t = hub_feature(module.encode_report_features, zi, txt.shape[1], txt_norm)
        hub_i = hub_feature(module.encode_image_features, zt, img.shape[1], img_norm)
        txt, img = hub_t + 0.3 * txt, hub_i + 0.3 * img
        with torch.no_grad():
            log.info("hub canaries: mean cos with the other modality %.3f (report), %.3f (image); real pairs %.3f",
                     float((module.encode_report_features(txt) @ zi.T).mean()), float((module.encode_image_features(img) @ zt.T).mean()),
                     float((zi * zt[train["item_study"]]).sum(1).mean()))
    elif kind != "random":
        raise ValueError(f"canary kind must be random | hub, got {kind!r}")
    ids = [f"canary-{kind}-{i}" for i in range(m)]
    n_pat = int(train["study_patient"].max()) + 1
    return {"image": img, "item_study": torch.arange(m), "item_index": -1 - torch.arange(m), "text": txt,
            "labels": torch.zeros(m, train["labels"].shape[1]), "study_patient": n_pat + torch.arange(m),
            "study_key": stable_keys([(i, i) for i in ids]), "patient_key": stable_keys(ids)}


def with_canaries(train: dict, canaries: dict, included: np.ndarray) -> dict:
    """The private train split plus the included canaries (appended: stable keys make order moot)."""
    c = select_studies(canaries, torch.as_tensor(included))
    n = train["text"].shape[0]
    out = {k: torch.cat([train[k], c[k]]) for k in train if k not in ("item_study",)}
    out["item_study"] = torch.cat([train["item_study"], c["item_study"] + n])
    return out


# --------------------------------------------------------------------------- training and scores


def train_heads(ckpt, cfg, feats, public, mode, eps, epochs, dp_extra=None, batch_size=None) -> DPAlignmentModule:
    """A DP run on study units, seeded from the config's (public) seed as train.py seeds it."""
    return dp_results.train_heads(ckpt, cfg, feats, public, mode, True, float(eps), epochs, int(cfg.seed), "study",
                                  dp_extra=dp_extra, batch_size=batch_size)


def flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module._heads.parameters()])


def clipped_release(module, img, txt, bank, mode: str, summed: bool = True) -> torch.Tensor:
    """The pre-noise release of one batch at the module's current parameters (flattened); with
    ``summed=False`` the unclipped per-unit gradients [B, P] instead."""
    heads = module._heads
    params = {k: v.detach() for k, v in heads.named_parameters()}
    c = float(module.hparams.dp["max_grad_norm"])
    mask = torch.ones(img.shape[0], 1)
    if mode == "group_clipping":  # one group holding the whole batch
        sums, _ = module.group_clipped_sum(img[:, None], txt[:, None], mask, torch.arange(img.shape[0]), 1, step=0)
        return torch.cat([s.flatten() for s in sums])

    def losses(p):
        zi, zt = functional_call(heads, p, (img, txt))
        return module.unit_losses(F.normalize(zi, dim=-1)[:, None], F.normalize(zt, dim=-1)[:, None], mask, bank)

    jac = jacrev(losses)(params)  # per-unit gradients [B, ...] of every parameter
    per_unit = torch.cat([j.reshape(img.shape[0], -1) for j in jac.values()], dim=1)
    if not summed:
        return per_unit
    factor = (c / (per_unit.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return (per_unit * factor).sum(0)


def release_directions(ckpt, cfg, feats, public, canaries, mode: str, ref_size: int, seed: int) -> torch.Tensor:
    """d_i = release(R + canary i) - release(R) at theta_0, for a fixed reference batch R of real units."""
    module = DPAlignmentModule(backbone_ckpt=ckpt, loss={**OmegaConf.to_container(cfg.model.loss), "mode": mode},
                               dp=OmegaConf.to_container(cfg.model.dp, resolve=True), optimizer=OmegaConf.to_container(cfg.model.optimizer))
    tr = feats["train"]
    g = torch.Generator().manual_seed(seed)
    ref = torch.randperm(tr["text"].shape[0], generator=g)[:ref_size]
    units = pool_units(tr, "study")  # study units: views averaged, as the DP stage trains on them
    r_img, r_txt = units["img"][ref, 0], units["txt"][ref, 0]
    bank = None
    if mode == "public_negatives":
        k = int(cfg.model.loss.bank_size)
        with torch.no_grad():
            bank = (module.encode_image_features(public[0][:k]), module.encode_report_features(public[1][:k]))
    if mode == "public_negatives":  # a unit's loss reads only itself: d_i is its own clipped gradient
        c = float(module.hparams.dp["max_grad_norm"])
        d = clipped_release(module, canaries["image"], canaries["text"], bank, mode, summed=False)
        return d * (c / (d.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    base = clipped_release(module, r_img, r_txt, bank, mode)
    out = []
    for i in range(canaries["text"].shape[0]):
        img = torch.cat([r_img, canaries["image"][i : i + 1]])
        txt = torch.cat([r_txt, canaries["text"][i : i + 1]])
        out.append(clipped_release(module, img, txt, bank, mode) - base)
    return torch.stack(out)


@torch.no_grad()
def scores(module, theta0: torch.Tensor, canaries: dict, directions: torch.Tensor) -> dict[str, np.ndarray]:
    zi = module.encode_image_features(canaries["image"])
    zt = module.encode_report_features(canaries["text"])
    sim = zi @ zt.T
    m = sim.shape[0]
    relink = sim.diag() - (sim.sum(1) - sim.diag()) / (m - 1)
    delta = flat_params(module) - theta0
    # Centred: what the canaries share (every hub pushes the same way) says nothing about which is in.
    d = directions - directions.mean(0, keepdim=True)
    white = -(d @ delta) / d.norm(dim=1).clamp(min=1e-12)
    return {"relink": relink.numpy(), "whitebox": white.numpy()}


# --------------------------------------------------------------------------- replay


def replay_attack(ckpt, cfg, feats, public, canaries, r: int, insecure: bool, seed: int, n_sub: int) -> dict:
    rng = np.random.default_rng(seed)
    included = rng.random(r) < 0.5
    sub = select_studies(feats["train"], torch.arange(feats["train"]["text"].shape[0]) < n_sub)
    can = select_studies(canaries, torch.arange(canaries["text"].shape[0]) < r)
    extra = {"INSECURE_replayable_seed": 1234} if insecure else None

    def run(inc):
        f = {**feats, "train": with_canaries(sub, can, inc)}
        return flat_params(train_heads(ckpt, cfg, f, public, "public_negatives", 1.0, 2, extra, batch_size=64))

    release = run(included)
    guesses = np.empty(r, dtype=bool)
    for i in range(r):
        alt = included.copy()
        alt[i] = True  # the adversary's hypothesis "canary i is in", every other record as it is
        guesses[i] = bool(torch.equal(run(alt), release))
    v = int((guesses == included).sum())
    delta = 1.0 / (10 * (n_sub + int(included.sum())))
    return {"noise": "INSECURE_replayable_seed" if insecure else "secret", "m": r, "r": r, "v": v,
            "epsilon_lower_bound": epsilon_lower_bound(r, r, v, delta, confidence=0.95), "delta": delta}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="stage-2 dual-tower checkpoint")
    ap.add_argument("--m", type=int, default=500, help="canaries per run")
    ap.add_argument("--eps", default="0.34,1,3,8")
    ap.add_argument("--modes", default="public_negatives,group_clipping,in_batch")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--ref-size", type=int, default=63, help="reference batch for the white-box directions")
    ap.add_argument("--replay", type=int, default=100, help="canaries of the replay attack (0: skip)")
    ap.add_argument("--seed", type=int, default=0, help="auditor's randomness (canaries, inclusion); never the DP noise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "logs" / "dp_canary_audit"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in ("lightning.pytorch", "lightning.fabric", "cxr_relink.models.dp.module"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.time()
    cfg = dp_results.compose_cfg(args.ckpt, args.overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    feats = {k: v for k, v in dm.features.items() if k != "public"}
    public = dm.public
    # The heads every run starts from (model.dp.head_init: fresh from the public head_init_seed, or stage 2's).
    stage2_heads = DPAlignmentModule(backbone_ckpt=args.ckpt, dp=OmegaConf.to_container(cfg.model.dp, resolve=True))
    theta0 = flat_params(stage2_heads)
    rows = []
    for mode in args.modes.split(","):
        kinds = ("random", "hub") if mode == "in_batch" else ("random",)
        for kind in kinds:
            canaries = make_canaries(feats["train"], args.m, kind, seed=args.seed + 1, module=stage2_heads)
            t = time.time()
            dirs = release_directions(args.ckpt, cfg, feats, public, canaries, mode, args.ref_size, args.seed)
            log.info("%s/%s: white-box directions in %.0f s (mean norm %.3g C)", mode, kind, time.time() - t,
                     float(dirs.norm(dim=1).mean()) / float(cfg.model.dp.max_grad_norm))
            for eps in args.eps.split(","):
                t = time.time()
                rng = np.random.default_rng([args.seed, len(rows)])
                included = rng.random(args.m) < 0.5
                f = {**feats, "train": with_canaries(feats["train"], canaries, included)}
                module = train_heads(args.ckpt, cfg, f, public, mode, float(eps), args.epochs)
                res = audit_from_scores(scores(module, theta0, canaries, dirs), included, delta=module.delta, confidence=0.95)
                state = module.dp_state()
                rows.append({"mode": mode, "canaries": kind, "target_epsilon": float(eps), "epsilon_spent": state["epsilon_spent"],
                             "guarantee_valid": state["guarantee_valid"], "sigma": state["noise_multiplier"], "q": state["sample_rate"],
                             "delta": state["delta"], "n_units": module.n_train_units, "audit": res, "seconds": time.time() - t})
                log.info("%s/%s eps=%s: lower bound %.3f (%s, k=%d, v=%d/%d) in %.0f s", mode, kind, eps, res["epsilon_lower_bound"],
                         res["best"]["scores"], res["best"]["k_pos"], res["best"]["v"], res["best"]["r"], time.time() - t)
    replay = []
    if args.replay:
        canaries = make_canaries(feats["train"], args.replay, "random", seed=args.seed + 2)
        for insecure in (True, False):
            t = time.time()
            replay.append({**replay_attack(args.ckpt, cfg, feats, public, canaries, args.replay, insecure, args.seed, n_sub=400),
                           "seconds": time.time() - t})
            log.info("replay (%s): %s", replay[-1]["noise"], replay[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"args": vars(args), "machine": describe(), "rows": rows, "replay": replay, "seconds": time.time() - t0}
    (out / "dp_canary_audit.json").write_text(json.dumps(doc, indent=1, default=str))
    md = render(doc)
    (out / "dp_canary_audit.md").write_text(md)
    print(md)


def render(doc) -> str:
    a = doc["args"]
    lines = [f"m = {a['m']} canaries per run (each in with probability 1/2), {a['epochs']} epochs, stage-2 checkpoint "
             f"`{a['ckpt']}`; lower bounds at 95% confidence (Bonferroni over 2 scores x the guess grid); "
             f"{doc['seconds'] / 60:.1f} min on {doc['machine']}.", "",
             "| loss mode | canaries | nominal ε (δ) | σ | empirical ε lower bound | best score, guesses (correct/made) | exceeds nominal? |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        b = r["audit"]["best"]
        nominal = f"{r['epsilon_spent']:.3f} ({r['delta']:.1e})" + ("" if r["guarantee_valid"] else " **no valid ε**")
        exceeds = "**yes**" if r["audit"]["epsilon_lower_bound"] > r["epsilon_spent"] else "no"
        lines.append(f"| {r['mode']} | {r['canaries']} | {nominal} | {r['sigma']:.3f} | {r['audit']['epsilon_lower_bound']:.3f} | "
                     f"{b['scores']}, {b['v']}/{b['r']} | {exceeds} |")
    if doc["replay"]:
        lines += ["", "**Replay adversary** (knows the seed and every record but the target; public_negatives, target ε = 1):", "",
                  "| noise | canaries | correct guesses | empirical ε lower bound |", "|---|---|---|---|"]
        for r in doc["replay"]:
            lines.append(f"| {r['noise']} | {r['m']} | {r['v']}/{r['r']} | {r['epsilon_lower_bound']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
