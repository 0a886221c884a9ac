"""DP stage speed: one epoch on cached features vs forwarding the frozen encoders, and DP vs non-private.

    python -m bench.bench_dp [--units 3400] [--batch 256] [--epochs 3] [--threads 1]

* "encoders" = what a DP epoch would cost without the feature cache: the frozen towers of the
  default stage-2 model (configs/model/bert_encoder.yaml: SmallCNN at 128^2, 2-layer BERT) run over
  every training study (1.5 views per study on average, one report), measured on a few batches and
  scaled to the epoch (content does not change the cost).
* "cached" = a real Lightning epoch of DPAlignmentModule on cached features (Poisson sampling,
  public bank, Opacus per-sample clipping and noise), median over epochs; the same with
  dp.enabled=false is the non-private epoch. Goals: encoders / cached-DP >= 50x; DP / non-private <= 2x.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from bench.machine import describe  # noqa: E402
from cxr_relink.configs import CONFIG_DIR  # noqa: E402
from cxr_relink.models.dp.features import InMemoryFeatureDataModule, stable_keys  # noqa: E402
from cxr_relink.models.dp.module import DPAlignmentModule  # noqa: E402


def encoder_epoch_seconds(n_units: int, batches: int, batch: int, views_per_study: float = 1.5) -> tuple[float, int, int]:
    from cxr_relink.datamodules.text import build_tokenizer
    from cxr_relink.models.dual_tower import DualTowerModule

    cfg = OmegaConf.load(CONFIG_DIR / "model" / "bert_encoder.yaml")
    img_cfg = OmegaConf.to_container(cfg.image_tower)
    img_cfg["in_channels"] = 1
    txt_cfg = OmegaConf.to_container(cfg.text_tower)
    txt_cfg["pretrained"] = None
    words = "left right small large pleural effusion no acute findings heart size normal tube tip lung".split()
    tok = build_tokenizer([" ".join(words[i % 9 : i % 9 + 6]) for i in range(200)], vocab_size=200)
    m = DualTowerModule(image_tower=img_cfg, text_tower=txt_cfg, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True},
                        embed_dim=int(cfg.embed_dim), tokenizer=tok).eval()
    ids = torch.randint(5, len(tok), (batch, 96))
    mask = torch.ones_like(ids)
    img = torch.randn(batch, 1, 128, 128)
    with torch.no_grad():
        m.image_features(img[:4]), m.text_features(ids[:4], mask[:4])  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            m.image_features(img)
        t_img = (time.perf_counter() - t0) / (batches * batch)
        t0 = time.perf_counter()
        for _ in range(batches):
            m.text_features(ids, mask)
        t_txt = (time.perf_counter() - t0) / (batches * batch)
    return n_units * (views_per_study * t_img + t_txt), m.image_tower.output_dim, m.text_tower.output_dim


def features(n: int, di: int, dt: int, seed: int = 0):
    """Random cached features with the shapes of a real split (1.5 views per study on average)."""
    g = torch.Generator().manual_seed(seed)

    def split(name, n_st):
        items = torch.cat([torch.arange(n_st), torch.arange(0, n_st, 2)]).sort().values
        patients = [f"{name}-p{i // 2}" for i in range(n_st)]  # two studies per patient
        return {"image": torch.randn(items.numel(), di, generator=g), "item_study": items, "item_index": torch.arange(items.numel()),
                "text": torch.randn(n_st, dt, generator=g), "labels": torch.randint(0, 2, (n_st, 14), generator=g).float(),
                "study_patient": torch.arange(n_st) // 2,
                # the stable unit ids DP pooling requires (models/dp/features.py)
                "study_key": stable_keys([(p, f"s{i}") for i, p in enumerate(patients)]), "patient_key": stable_keys(patients)}

    return ({"train": split("train", n), "val": split("val", 64), "test": split("test", 64)},
            (torch.randn(1500, di, generator=g), torch.randn(1500, dt, generator=g)))


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.t0)


def cached_epoch_seconds(feats, pub, di, dt, mode: str, dp: bool, batch: int, epochs: int, embed: int = 128) -> float:
    L.seed_everything(0, verbose=False)
    m = DPAlignmentModule(heads={"image_dim": di, "text_dim": dt, "embed_dim": embed}, loss={"mode": mode, "bank_size": 1024},
                          dp={"enabled": dp, "target_epsilon": 3.0})
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(m, datamodule=InMemoryFeatureDataModule(feats, pub, batch_size=batch))
    t0 = time.perf_counter()
    m.epsilon_spent()  # the per-epoch accounting (dp/epsilon) runs outside the timed window: time it here
    acct = time.perf_counter() - t0 if dp else 0.0
    return statistics.median(timer.times[1:] if len(timer.times) > 1 else timer.times), acct


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=3400, help="training studies (synthcxr default: ~3,400)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--encoder-batches", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="public_negatives,group_clipping,in_batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("cxr_relink.models.dp.module").setLevel(logging.ERROR)
    enc, di, dt = encoder_epoch_seconds(args.units, args.encoder_batches, 64)
    feats, pub = features(args.units, di, dt)
    rows = []
    for mode in args.modes.split(","):
        t_dp, acct = cached_epoch_seconds(feats, pub, di, dt, mode, True, args.batch, args.epochs)
        t_np, _ = cached_epoch_seconds(feats, pub, di, dt, mode, False, args.batch, args.epochs)
        rows.append((mode, t_dp, t_np, acct))
    print(f"\nmachine: {describe()}")
    print(f"N = {args.units} study units, expected batch {args.batch}, features {di}/{dt} -> 128, public bank 1024")
    print(f"frozen encoders, one pass over the training studies (extrapolated from {args.encoder_batches} batches of 64): {enc:.2f} s\n")
    print("| loss mode | DP epoch, cached (s) | non-private epoch, cached (s) | encoders / DP-cached | DP / non-private "
          "| epsilon accounting, once per epoch (s) |")
    print("|---|---|---|---|---|---|")
    for mode, t_dp, t_np, acct in rows:
        flag = " (no valid eps)" if mode == "in_batch" else ""
        print(f"| {mode}{flag} | {t_dp:.3f} | {t_np:.3f} | {enc / t_dp:.0f}x | {t_dp / t_np:.2f}x | {acct:.3f} |")


if __name__ == "__main__":
    main()
