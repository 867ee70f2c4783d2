#!/usr/bin/env python
"""WiSE-FT sweep on the sample catalogue: what train.wise_alpha trades between trained and zero-shot classes.

Fine-tuning the image tower makes the model forget what its base knew about classes it never saw
(docs/learning.md). WiSE-FT interpolates the fine-tuned towers with the base's. Per seed, one run:

1. generate the sample catalogue and preprocess every image once (as bench/ablation.py does);
2. pretrain the stand-in base model, fine-tune it once with the config's train section;
3. for each alpha, interpolate (train.wise_alpha semantics, mumic_batch.model.train.wise_ft) and score
   the test split: GAP@k and mAP over the fine-tuning classes (clean labels), and ROC AUC of each
   zero-shot holdout class from its prompt; plus validation GAP, the number a user can choose alpha by.

Prints one table of mean +- std over seeds and the machine; the last stdout line is the result as JSON.

    python bench/wise_ft.py                      # 3 seeds, the demo's settings (conf/local.yaml)
    python bench/wise_ft.py --seeds 1 --set train.towers=both
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

import torch  # noqa: E402
from ablation import load_sample, machine, mean_std_table, pretrained_base, splits, targets  # noqa: E402

from mumic_batch.config import JobCfg, load_config  # noqa: E402
from mumic_batch.core import metrics  # noqa: E402
from mumic_batch.core.sample import CLASSES, HOLDOUTS  # noqa: E402
from mumic_batch.model.base import set_bias  # noqa: E402
from mumic_batch.model.train import Classifier, fit, predict, tower_weights, wise_ft  # noqa: E402

log = logging.getLogger("bench.wise_ft")

ALPHAS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
CPU = torch.device("cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "conf" / "local.yaml"), help="settings the runs start from")
    p.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help=f"alphas (default {ALPHAS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.towers=both (repeatable)")
    return p.parse_args(argv)


def split_data(cfg: JobCfg, labels, pixels: torch.Tensor) -> dict:
    """bench/ablation.py's splits, plus the zero-shot holdout classes' test labels."""
    holdouts = [c for c in CLASSES if c.name in HOLDOUTS]
    data = splits(cfg, labels, pixels)
    data["holdouts"] = holdouts
    data["holdout_y"] = targets(labels, data["test_rows"], "clean_labels", [c.name for c in holdouts]).numpy()
    return data


def score(clf: Classifier, data: dict, k: int) -> dict[str, float]:
    """Test GAP@k and mAP on the trained classes, zero-shot AUC per holdout, validation GAP."""
    probs = predict(clf, data["test_pixels"], CPU, "fp32")
    out = {f"gap_at_{k}": metrics.gap_at_k(data["test_y"], probs, k),
           "map": metrics.macro_map(data["test_y"], probs, data["map_idx"])}
    with torch.no_grad():
        zs = (clf.model.encode_images(data["test_pixels"])
              @ clf.model.encode_prompts([c.prompt for c in data["holdouts"]]).T).numpy()
    for j, c in enumerate(data["holdouts"]):
        out[f"auc_{c.name}"] = metrics.roc_auc(data["holdout_y"][:, j], zs[:, j])
    out["val_gap"] = metrics.gap_at_k(data["val"].targets.numpy(), predict(clf, data["val"].pixels, CPU, "fp32"))
    return out


def sweep(cfg: JobCfg, args: argparse.Namespace, work: Path) -> dict[float, list[dict[str, float]]]:
    labels, pixels = load_sample(cfg, cfg.sample.n_images, work)
    data = split_data(cfg, labels, pixels)
    tcfg = dataclasses.replace(cfg.train, device="cpu", checkpoint_every=0)
    results: dict[float, list[dict[str, float]]] = {a: [] for a in args.alphas}
    for seed in range(args.seeds):
        model = pretrained_base(cfg, labels, pixels, seed)
        set_bias(model, tcfg.bias, tcfg.init_bias)
        base = tower_weights(model)
        clf = Classifier(model, data["prompts"])
        fit(clf, data["train"], data["val"], dataclasses.replace(tcfg, seed=seed), CPU)
        for alpha in args.alphas:
            mixed = copy.deepcopy(clf)
            wise_ft(mixed.model, base, alpha)
            results[alpha].append(score(mixed, data, data["k"]))
            log.info("seed %d, alpha %.2f: %s", seed, alpha, {k: round(v, 4) for k, v in results[alpha][-1].items()})
    return results


def table(results: dict[float, list[dict[str, float]]]) -> str:
    cols = list(next(iter(results.values()))[0])
    return mean_std_table("alpha", cols, cols, {f"{a:.1f}": runs for a, runs in results.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mumic-wise-") as tmp:
        results = sweep(cfg, args, Path(tmp))
    elapsed = time.perf_counter() - started
    print(f"WiSE-FT sweep: {cfg.sample.n_images} sample images, {args.seeds} seeds, towers={cfg.train.towers}, "
          f"{cfg.train.epochs} epochs; test split; {elapsed / 60:.1f} min")
    print(f"Machine: {machine()}\n")
    print(table(results))
    print(json.dumps({"machine": machine(), "seconds": elapsed, "seeds": args.seeds, "towers": cfg.train.towers,
                      "results": {str(a): r for a, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
