#!/usr/bin/env python
"""Zero-shot retention on the sample catalogue: which fine-tuning keeps the base's zero-shot classes?

Fine-tuning the image tower makes the model forget what its base knew about classes it never saw
(docs/learning.md). Per seed, on one preprocessed image cache (as bench/ablation.py):

1. pretrain the stand-in base model and score it (prompts only);
2. fine-tune it once per method (the config's train section with the method's changes) and score each
   fine-tuned model, and its WiSE-FT interpolations, on the test split: GAP@k, GAP and mAP over the
   fine-tuning classes (clean labels), ROC AUC of each zero-shot holdout class from its prompt, and
   validation GAP; and the threshold check of the demo (thresholds chosen on validation, checked on test).

Methods: the default (image tower), both towers at a lower rate, feature preservation (an L2 penalty
between the fine-tuned and the base image embeddings, train.preserve), partial tuning of the image
tower's last blocks (train.image_groups) and WiSE-FT (train.wise_alpha) on top of them. Prints one table
of mean +- std over seeds and the machine; the last stdout line is the result as JSON.

    python bench/retention.py                    # 3 seeds, the demo's settings (conf/local.yaml)
    python bench/retention.py --seeds 1 --methods default preserve-10
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ablation import load_sample, machine, mean_std_table, pretrained_base  # noqa: E402
from wise_ft import score, split_data  # noqa: E402

from mumic_batch.config import JobCfg, load_config  # noqa: E402
from mumic_batch.core import metrics  # noqa: E402
from mumic_batch.core.thresholds import choose_thresholds  # noqa: E402
from mumic_batch.model.base import set_bias  # noqa: E402
from mumic_batch.model.train import Classifier, fit, predict, tower_weights, wise_ft  # noqa: E402

log = logging.getLogger("bench.retention")

CPU = torch.device("cpu")
BOTH_LOW = {"towers": "both", "lr_image": 5e-4, "lr_text": 5e-4}
# name -> (TrainCfg changes, WiSE-FT alphas scored besides 1.0)
METHODS: dict[str, tuple[dict, tuple[float, ...]]] = {
    "default": ({}, (0.8,)),
    "preserve-10": ({"preserve": 10.0}, (0.8,)),
    "both-5e-4": (BOTH_LOW, (0.8,)),
    "last-2-groups": ({"image_groups": 2}, ()),
    "preserve-1": ({"preserve": 1.0}, ()),
    "both-5e-4-preserve-10": ({**BOTH_LOW, "preserve": 10.0}, (0.8,)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "conf" / "local.yaml"), help="settings the runs start from")
    p.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--partial", help="rewrite this JSON file with the results so far after every fit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every run (repeatable)")
    return p.parse_args(argv)


def scores(clf: Classifier, data: dict, target: float) -> dict[str, float]:
    """bench/wise_ft.py's scores, test GAP over all fine-tuning classes, and the threshold check.

    Thresholds come from the validation split as jobs/train.py chooses them; on the test split, `misses`
    counts the assigned classes with test AP >= 0.8 whose precision is more than 0.1 off the target, and
    `over` the classes assigned to more than twice their test prevalence (the demo's goals).
    """
    out = score(clf, data, data["k"])
    probs = predict(clf, data["test_pixels"], CPU, "fp32")
    out["gap"] = metrics.gap_at_k(data["test_y"], probs)
    val_probs = predict(clf, data["val"].pixels, CPU, "fp32")
    choices = choose_thresholds(data["val"].targets.numpy(), val_probs, target)
    thresholds = np.array([c.threshold if c.assign else np.inf for c in choices])
    precision, _ = metrics.precision_recall_at(data["test_y"], probs, thresholds)
    aps = metrics.per_class_ap(data["test_y"], probs)
    assigned = (probs >= thresholds).mean(axis=0)
    out["misses"] = float(sum(c.assign and ap >= 0.8 and not abs(p - target) <= 0.1
                              for c, ap, p in zip(choices, aps, precision)))
    out["over"] = float(np.sum(assigned > 2.0 * data["test_y"].mean(axis=0)))
    out["assigned"] = float(sum(c.assign for c in choices))
    return out


def sweep(cfg: JobCfg, args: argparse.Namespace, work: Path) -> dict[str, list[dict[str, float]]]:
    labels, pixels = load_sample(cfg, cfg.sample.n_images, work)
    data = split_data(cfg, labels, pixels)
    tcfg = dataclasses.replace(cfg.train, device="cpu", checkpoint_every=0)
    results: dict[str, list[dict[str, float]]] = {"base (no fine-tuning)": []}
    for seed in range(args.seeds):
        model = pretrained_base(cfg, labels, pixels, seed)
        set_bias(model, tcfg.bias, tcfg.init_bias)
        base = tower_weights(model)
        results["base (no fine-tuning)"].append(scores(Classifier(copy.deepcopy(model), data["prompts"]), data,
                                                         tcfg.target_precision))
        for name in args.methods:
            changes, alphas = METHODS[name]
            clf = Classifier(copy.deepcopy(model), data["prompts"])
            started = time.perf_counter()
            fit(clf, data["train"], data["val"], dataclasses.replace(tcfg, seed=seed, **changes), CPU)
            seconds = time.perf_counter() - started
            for alpha in (1.0, *alphas):
                mixed = copy.deepcopy(clf)
                wise_ft(mixed.model, base, alpha)
                row = f"{name}" + ("" if alpha == 1.0 else f" + WiSE {alpha}")
                results.setdefault(row, []).append({**scores(mixed, data, tcfg.target_precision), "seconds": seconds})
                log.info("seed %d, %s: %s", seed, row, {k: round(v, 4) for k, v in results[row][-1].items()})
            if args.partial:
                Path(args.partial).write_text(json.dumps(results))
    return results


def table(results: dict[str, list[dict[str, float]]], k: int) -> str:
    cols = [f"gap_at_{k}", "gap", "map", "auc_purple", "auc_striped_background", "val_gap", "assigned", "misses",
            "over"]
    titles = [f"test GAP@{k}", "test GAP", "test mAP", "purple AUC", "striped_background AUC", "val GAP",
              "classes assigned", "precision off target", "over-assigned"]
    return mean_std_table("method", titles, cols, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumic-retention-") as tmp:
        results = sweep(cfg, args, Path(tmp))
    elapsed = time.perf_counter() - started
    print(f"Zero-shot retention: {cfg.sample.n_images} sample images, {args.seeds} seeds, {cfg.train.epochs} epochs; "
          f"test split; {elapsed / 60:.1f} min")
    print(f"Machine: {machine()}\n")
    print(table(results, cfg.evaluate.gap_k))
    print(json.dumps({"machine": machine(), "seconds": elapsed, "seeds": args.seeds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
