#!/usr/bin/env python
"""Loss ablation on the sample catalogue: does MuMIC's tempered-sigmoid loss win?

One run, one machine, one preprocessed image cache shared by every variant:

1. generate the sample catalogue (sample section of --config, 640x480 JPEGs) in a temporary directory and
   preprocess every image once for the demo architecture;
2. per seed, pretrain the stand-in base model (pretrain section) on the train split's captions;
3. per seed and variant, fine-tune from that base (train section, only the variant's settings changed,
   --epochs epochs; the linear probe gets 5x as many, being cheap and slow to converge) and score the test split (clean labels) over the fine-tuning classes: GAP, GAP@k and macro mAP over the
   evaluate.majority best-supported classes.

Variants: a linear probe with plain BCE (frozen backbone, trainable class weights), focal loss, asymmetric
loss (ASL), the tempered sigmoid with a fixed temperature, with a learnable one, and with a learnable one
plus bias (MuMIC as the training job runs it). Prints a table of mean +- std over the seeds and the
machine; the last stdout line is the whole result as JSON.

    python bench/ablation.py                 # 3 seeds, the demo's settings (conf/local.yaml)
    python bench/ablation.py --seeds 5 --epochs 40 --set train.init_bias=-4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/ablation.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mumic_batch.config import JobCfg, TrainCfg, load_config  # noqa: E402
from mumic_batch.core import metrics  # noqa: E402
from mumic_batch.core.sample import fine_tune_classes, generate_sample  # noqa: E402
from mumic_batch.model.backbone import named_architecture, preprocess_spec  # noqa: E402
from mumic_batch.model.base import set_bias  # noqa: E402
from mumic_batch.model.images import load_pixels  # noqa: E402
from mumic_batch.model.mumic import MuMIC, build_mumic  # noqa: E402
from mumic_batch.model.pretrain import PairSet, pretrain  # noqa: E402
from mumic_batch.model.train import Classifier, LabelledSet, fit, predict  # noqa: E402

log = logging.getLogger("bench.ablation")

DEFAULT_EPOCHS = 40  # fewer than the demo's 60 so that 3 seeds x 6 variants stay under ~15 min on 2 cores
# A linear probe on cached embeddings costs milliseconds per epoch but converges slowly: give it 5x the epochs.
PROBE_EPOCH_FACTOR = 5
# name -> (head, TrainCfg changes); everything else comes from the config's train section.
VARIANTS: dict[str, tuple[str, dict]] = {
    "linear probe, plain BCE": ("linear", {"towers": "none", "loss": "tempered", "gamma": 0.0,
                                           "epoch_factor": PROBE_EPOCH_FACTOR}),
    "focal loss": ("prompt", {"loss": "focal"}),
    "asymmetric loss (ASL)": ("prompt", {"loss": "asl"}),
    "tempered sigmoid, fixed T": ("prompt", {"loss": "tempered", "learn_scale": False}),
    "tempered sigmoid, learnable T, no bias": ("prompt", {"loss": "tempered", "bias": False}),
    "tempered sigmoid, learnable T + bias": ("prompt", {"loss": "tempered"}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "conf" / "local.yaml"), help="settings the runs start from")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"fine-tuning epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--images", type=int, help="sample images (default: sample.n_images of the config)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.steps=100 (repeatable)")
    return p.parse_args(argv)


def machine() -> str:
    """CPU model, cores and library versions, for the record next to the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"python {platform.python_version()}; {platform.system()} {platform.release()}")


def load_sample(cfg: JobCfg, n_images: int, work: Path) -> tuple:
    """Generate the catalogue and preprocess every image once (the cache every run shares)."""
    sample_cfg = dataclasses.replace(cfg.sample, out_dir=str(work / "sample"), n_images=n_images)
    labels = generate_sample(sample_cfg).labels
    spec = preprocess_spec(build_mumic(named_architecture(cfg.pretrain.architecture), seed=0).backbone)
    fetch = dataclasses.replace(cfg.fetch, local_roots=(str(work / "sample" / "images"),))
    loaded = load_pixels(list(labels["uri"]), spec, fetch, cfg.decode, cfg.fetch.threads)
    if loaded.failures:
        raise RuntimeError(f"sample images failed to load: {dict(loaded.failures)}")
    return labels, torch.from_numpy(loaded.pixels)


def targets(labels, rows: np.ndarray, column: str, names: list[str]) -> torch.Tensor:
    return torch.tensor([[n in row for n in names] for row in labels[column].iloc[rows]], dtype=torch.float32)


def splits(cfg: JobCfg, labels, pixels: torch.Tensor) -> dict:
    """Train and val sets (noisy labels) and the test split (clean labels) over the fine-tuning classes."""
    names = [c.name for c in fine_tune_classes()]
    rows = {s: np.flatnonzero(labels["split"] == s) for s in ("train", "val", "test")}
    test_y = targets(labels, rows["test"], "clean_labels", names).numpy()
    return {
        "prompts": [c.prompt for c in fine_tune_classes()], "test_rows": rows["test"],
        "train": LabelledSet(pixels[rows["train"]], targets(labels, rows["train"], "labels", names)),
        "val": LabelledSet(pixels[rows["val"]], targets(labels, rows["val"], "labels", names)),
        "test_pixels": pixels[rows["test"]], "test_y": test_y, "k": cfg.evaluate.gap_k,
        "map_idx": metrics.majority_classes(test_y, cfg.evaluate.majority),
    }


def pretrained_base(cfg: JobCfg, labels, pixels: torch.Tensor, seed: int) -> MuMIC:
    """The stand-in base model of one seed, pretrained on the train split's captions."""
    model = build_mumic(named_architecture(cfg.pretrain.architecture), seed=seed)
    tokens = model.tokenize(list(labels[cfg.pretrain.caption_column]))
    train, val = (np.flatnonzero(labels["split"] == s) for s in (cfg.pretrain.split, cfg.pretrain.val_split))
    pcfg = dataclasses.replace(cfg.pretrain, seed=seed, device="cpu")
    pretrain(model, PairSet(pixels[train], tokens[train]), PairSet(pixels[val], tokens[val]), pcfg, torch.device("cpu"))
    return model


def run_variant(base: MuMIC, head: str, tcfg: TrainCfg, data: dict) -> dict[str, float]:
    """Fine-tune one variant from a copy of `base`; score the test split."""
    model = copy.deepcopy(base)
    set_bias(model, tcfg.bias, tcfg.init_bias)
    clf = Classifier(model, data["prompts"], head=head)
    result = fit(clf, data["train"], data["val"], tcfg, torch.device("cpu"))
    probs = predict(clf, data["test_pixels"], torch.device("cpu"), "fp32")
    scores = metrics.summary(data["test_y"], probs, data["k"], data["map_idx"])
    return {**scores, "best_epoch": result.best_epoch + 1, "seconds": result.seconds}


def ablation(cfg: JobCfg, args: argparse.Namespace, work: Path) -> dict[str, list[dict[str, float]]]:
    labels, pixels = load_sample(cfg, args.images or cfg.sample.n_images, work)
    data = splits(cfg, labels, pixels)
    base_cfg = dataclasses.replace(cfg.train, device="cpu", checkpoint_every=0, epochs=args.epochs)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        base = pretrained_base(cfg, labels, pixels, seed)
        for name, (head, changes) in VARIANTS.items():
            settings = {k: v for k, v in changes.items() if k != "epoch_factor"}
            settings["epochs"] = base_cfg.epochs * changes.get("epoch_factor", 1)
            outcome = run_variant(base, head, dataclasses.replace(base_cfg, seed=seed, **settings), data)
            log.info("seed %d, %s: %s", seed, name, {k: round(v, 4) for k, v in outcome.items()})
            results[name].append(outcome)
    return results


def table(results: dict[str, list[dict[str, float]]], k: int) -> str:
    """Markdown table of mean +- sample std over seeds."""
    return mean_std_table("variant", ["GAP", f"GAP@{k}", "mAP"], ["gap", f"gap_at_{k}", "map"], results)


def mean_std_table(row_title: str, titles: list[str], cols: list[str], results: dict) -> str:
    """Markdown table, one row per key of `results`: mean +- sample std over its runs of each column."""
    lines = [f"| {row_title} | " + " | ".join(titles) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, runs in results.items():
        cells = []
        for col in cols:
            values = np.array([r[col] for r in runs])
            std = values.std(ddof=1) if values.size > 1 else 0.0
            cells.append(f"{values.mean():.3f} ± {std:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumic-ablation-") as tmp:
        results = ablation(cfg, args, Path(tmp))
    elapsed = time.perf_counter() - started
    n_images = args.images or cfg.sample.n_images
    print(f"Loss ablation: {n_images} sample images (seed {cfg.sample.seed}), {args.seeds} seeds, {args.epochs} epochs, "
          f"test split, {len(fine_tune_classes())} fine-tuning classes, mAP over the {cfg.evaluate.majority} "
          f"best-supported test classes; {elapsed / 60:.1f} min")
    print(f"Machine: {machine()}\n")
    print(table(results, cfg.evaluate.gap_k))
    print(json.dumps({"machine": machine(), "seconds": elapsed, "images": n_images, "seeds": args.seeds,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
