"""Learning without Spark: stand-in pretraining gives real zero-shot signal; fine-tuning resumes exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mumic_batch.config import DecodeCfg, FetchCfg, PretrainCfg, SampleCfg, TrainCfg
from mumic_batch.core import metrics
from mumic_batch.core.sample import CLASSES, HOLDOUTS, fine_tune_classes, generate_sample
from mumic_batch.model import train as train_mod
from mumic_batch.model.backbone import named_architecture, preprocess_spec
from mumic_batch.model.base import set_bias
from mumic_batch.model.images import load_pixels
from mumic_batch.model.losses import feature_preservation
from mumic_batch.model.mumic import MuMIC, build_mumic
from mumic_batch.model.pretrain import PairSet, pretrain
from mumic_batch.model.train import Classifier, LabelledSet, fit

CPU = torch.device("cpu")
FT_CLASSES = fine_tune_classes()
# Enough captions for the stand-in to learn colours and backgrounds (measured: docs/learning.md); 320x240
# canvases keep generation fast, and the demo architecture squashes every image to 96 px anyway.
N_IMAGES, PRETRAIN_STEPS, SEED = 800, 150, 0


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample catalogue's labels and every image preprocessed once for the demo architecture."""
    out = tmp_path_factory.mktemp("learning")
    labels = generate_sample(SampleCfg(out_dir=str(out), n_images=N_IMAGES, seed=SEED, width=320, height=240)).labels
    spec = preprocess_spec(build_mumic(named_architecture("demo"), seed=0).backbone)
    loaded = load_pixels(list(labels["uri"]), spec, FetchCfg(allowed_schemes=("file",)), DecodeCfg())
    assert loaded.rows.size == N_IMAGES and not loaded.failures
    return labels, torch.from_numpy(loaded.pixels)


@pytest.fixture(scope="module")
def pretrained(sample):
    """The stand-in base model, pretrained contrastively on the train split's captions only."""
    labels, pixels = sample
    model = build_mumic(named_architecture("demo"), seed=SEED)
    tokens = model.tokenize(list(labels["caption"]))
    train, val = (np.flatnonzero(labels["split"] == s) for s in ("train", "val"))
    cfg = PretrainCfg(steps=PRETRAIN_STEPS, batch_size=128, eval_every=25, seed=SEED)
    result = pretrain(model, PairSet(pixels[train], tokens[train]), PairSet(pixels[val], tokens[val]), cfg, CPU)
    return model, result


def _targets(labels, rows, names) -> torch.Tensor:
    return torch.tensor([[n in row for n in names] for row in labels["labels"].iloc[rows]], dtype=torch.float32)


def test_holdout_classes_score_above_chance_zero_shot_after_pretraining(sample, pretrained) -> None:
    labels, pixels = sample
    model, _ = pretrained
    unseen = np.flatnonzero(labels["split"] != "train")  # images pretraining never saw
    holdouts = [c for c in CLASSES if c.name in HOLDOUTS]
    with torch.no_grad():
        scores = (model.encode_images(pixels[unseen]) @ model.encode_prompts([c.prompt for c in holdouts]).T).numpy()
    for j, spec in enumerate(holdouts):
        y = np.array([spec.name in row for row in labels["clean_labels"].iloc[unseen]])
        auc, ap = metrics.roc_auc(y, scores[:, j]), metrics.average_precision(y, scores[:, j])
        # Chance is AUC 0.5 and AP = prevalence (~0.16); seed 0 measures ~0.8 AUC and ~2.5x prevalence.
        assert auc > 0.7, (spec.name, auc)
        assert ap > 2.0 * y.mean(), (spec.name, ap, y.mean())


def test_pretraining_keeps_the_step_with_the_lowest_validation_loss(pretrained) -> None:
    model, result = pretrained
    losses = {h["step"]: h["val_loss"] for h in result.history}
    assert result.kept_step == min(losses, key=losses.get)
    assert result.val_loss == pytest.approx(losses[result.kept_step])
    # MuMIC's temperature starts from the learned CLIP logit scale, as the paper's design asks.
    assert model.log_scale.item() == pytest.approx(model.backbone.logit_scale.item())


def _small_sets(sample, n_train: int = 96, n_val: int = 48) -> tuple[LabelledSet, LabelledSet]:
    labels, pixels = sample
    names = [c.name for c in FT_CLASSES]
    train = np.flatnonzero(labels["split"] == "train")[:n_train]
    val = np.flatnonzero(labels["split"] == "val")[:n_val]
    return (LabelledSet(pixels[train], _targets(labels, train, names)),
            LabelledSet(pixels[val], _targets(labels, val, names)))


def _classifier(base: MuMIC, cfg: TrainCfg) -> Classifier:
    model = copy.deepcopy(base)
    set_bias(model, cfg.bias, cfg.init_bias)
    return Classifier(model, [c.prompt for c in FT_CLASSES])


def _state(clf: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


def test_resumed_training_ends_bit_for_bit_like_an_uninterrupted_run(sample, pretrained, tmp_path: Path,
                                                                     monkeypatch) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample)
    cfg = TrainCfg(epochs=4, batch_size=32, checkpoint_every=1, patience=0, warmup_steps=3, seed=3)
    straight = _classifier(base, cfg)
    full = fit(straight, train, val, cfg, CPU, checkpoint_dir=tmp_path / "a", fingerprint="run")

    crashed = _classifier(base, cfg)
    real_epoch, calls = train_mod._run_epoch, []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_run_epoch", crash_in_third_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, train, val, cfg, CPU, checkpoint_dir=tmp_path / "b", fingerprint="run")
    monkeypatch.setattr(train_mod, "_run_epoch", real_epoch)
    resumed_clf = _classifier(base, cfg)  # a fresh process would start from the base model again
    resumed = fit(resumed_clf, train, val, cfg, CPU, checkpoint_dir=tmp_path / "b", fingerprint="run")

    assert resumed.resumed_from == 2 and full.resumed_from is None
    assert resumed.best_epoch == full.best_epoch and resumed.history == full.history
    expected, got = _state(straight), _state(resumed_clf)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "weights differ after resuming"
    np.testing.assert_array_equal(resumed.val_probs, full.val_probs)


def test_a_checkpoint_of_another_run_is_not_resumed(sample, pretrained, tmp_path: Path) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 64, 32)
    cfg = TrainCfg(epochs=2, batch_size=32, checkpoint_every=1, patience=0)
    fit(_classifier(base, cfg), train, val, cfg, CPU, checkpoint_dir=tmp_path, fingerprint="first")
    again = fit(_classifier(base, cfg), train, val, cfg, CPU, checkpoint_dir=tmp_path, fingerprint="first")
    other = fit(_classifier(base, cfg), train, val, cfg, CPU, checkpoint_dir=tmp_path, fingerprint="second")
    assert again.resumed_from == 2 and again.epochs_run == 2  # finished run: nothing left to do
    assert other.resumed_from is None and other.epochs_run == 2


def test_best_validation_epoch_is_kept(sample, pretrained) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample)
    cfg = TrainCfg(epochs=6, batch_size=32, patience=2, checkpoint_every=0)
    clf = _classifier(base, cfg)
    result = fit(clf, train, val, cfg, CPU)
    gaps = [h["val_gap"] for h in result.history]
    assert result.best_epoch == int(np.argmax(gaps)) and result.best_val_gap == max(gaps)
    assert result.stopped_early == (len(gaps) < cfg.epochs)
    probs = train_mod.predict(clf, val.pixels, CPU, "fp32")  # the kept weights reproduce the kept scores
    np.testing.assert_allclose(probs, result.val_probs, atol=1e-6)
    assert metrics.gap_at_k(val.targets.numpy(), probs) == pytest.approx(result.best_val_gap, abs=1e-6)


@pytest.mark.parametrize("towers", ["image", "text", "none"])
def test_only_the_chosen_towers_and_head_parameters_change(sample, pretrained, towers: str) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 64, 32)
    cfg = TrainCfg(epochs=1, batch_size=32, towers=towers, learn_scale=towers != "none", checkpoint_every=0)
    clf = _classifier(base, cfg)
    before = _state(clf)
    fit(clf, train, val, cfg, CPU)
    after = _state(clf)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    visual = any(k.startswith("model.backbone.visual.") for k in changed)
    text = any(k.startswith("model.backbone.") and not k.startswith("model.backbone.visual.")
               and k != "model.backbone.logit_scale" for k in changed)
    assert visual == (towers == "image") and text == (towers == "text"), sorted(changed)[:5]
    assert ("model.log_scale" in changed) == cfg.learn_scale
    assert "model.bias" in changed  # the bias always trains when the model has one
    assert "model.backbone.logit_scale" not in changed  # CLIP's own scale is replaced by log_scale


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_wise_ft_interpolates_the_towers_and_keeps_the_trained_head(sample, pretrained, alpha: float) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 64, 32)
    cfg = TrainCfg(epochs=2, batch_size=32, towers="both", checkpoint_every=0)
    clf = _classifier(base, cfg)
    before = train_mod.tower_weights(clf.model)
    fit(clf, train, val, cfg, CPU)
    tuned, head = train_mod.tower_weights(clf.model), (clf.model.log_scale.item(), clf.model.bias.item())
    train_mod.wise_ft(clf.model, before, alpha)
    after = train_mod.tower_weights(clf.model)
    assert any(not torch.equal(before[k], tuned[k]) for k in before)
    for k, w in after.items():
        # Integer buffers are counters (BatchNorm's batches seen): they stay as trained.
        want = before[k] + alpha * (tuned[k] - before[k]) if w.is_floating_point() else tuned[k]
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
    assert (clf.model.log_scale.item(), clf.model.bias.item()) == head
    if alpha == 0.0:  # the base model's embeddings, hence its zero-shot scores, come back exactly
        with torch.no_grad():
            torch.testing.assert_close(clf.model.encode_images(val.pixels), base.encode_images(val.pixels))


def test_linear_probe_baseline_starts_at_the_zero_shot_classifier(pretrained) -> None:
    base, _ = pretrained
    cfg = TrainCfg(bias=False)
    prompt_clf = _classifier(base, cfg)
    linear_clf = Classifier(copy.deepcopy(base), [c.prompt for c in FT_CLASSES], head="linear")
    image_emb = torch.nn.functional.normalize(torch.randn(5, base.embed_dim), dim=-1)
    with torch.no_grad():
        expected = prompt_clf.logits(image_emb, prompt_clf.class_embeddings())
        got = linear_clf.logits(image_emb, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masked_pairs_do_not_change_training(sample, pretrained) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 64, 32)
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(train.targets.shape, generator=gen) < 0.7).float()
    flipped = torch.where(mask > 0, train.targets, 1.0 - train.targets)  # every unannotated pair changes
    cfg = TrainCfg(epochs=1, batch_size=32, checkpoint_every=0, mask_unannotated=True)
    runs = []
    for targets in (train.targets, flipped):
        clf = _classifier(base, cfg)
        fit(clf, LabelledSet(train.pixels, targets, mask), val, cfg, CPU)
        runs.append(_state(clf))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_partial_tuning_trains_only_the_last_image_groups(sample, pretrained) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 64, 32)
    groups = train_mod.image_groups(base.backbone.visual)
    assert [g[0].split(".")[0] for g in groups[1:]] == ["layer1", "layer2", "layer3", "layer4", "attnpool"]
    cfg = TrainCfg(epochs=1, batch_size=32, image_groups=2, checkpoint_every=0)
    clf = _classifier(base, cfg)
    before = _state(clf)
    fit(clf, train, val, cfg, CPU)
    after = _state(clf)
    changed = {k.split(".")[3] for k in before if k.startswith("model.backbone.visual.")
               and not torch.equal(before[k], after[k])}
    # Frozen layers keep their BatchNorm statistics too: nothing before layer4 moves.
    assert changed == {"layer4", "attnpool"}


def test_feature_preservation_keeps_image_embeddings_near_the_base(sample, pretrained) -> None:
    base, _ = pretrained
    train, val = _small_sets(sample, 96, 48)
    with torch.no_grad():
        start = base.encode_images(val.pixels)
    drift = {}
    for preserve in (0.0, 50.0):
        cfg = TrainCfg(epochs=3, batch_size=32, checkpoint_every=0, patience=0, preserve=preserve)
        clf = _classifier(base, cfg)
        fit(clf, train, val, cfg, CPU)
        with torch.no_grad():
            drift[preserve] = float((clf.model.encode_images(val.pixels) - start).pow(2).sum(-1).mean())
    assert drift[50.0] < 0.5 * drift[0.0], drift


def test_feature_preservation_compares_like_with_like_at_the_first_step() -> None:
    """The base copy normalises in the same mode as the training tower and never updates its statistics."""
    visual = build_mumic(named_architecture("demo"), seed=0).backbone.visual.train()
    base = train_mod._frozen_copy(visual)
    stats = {k: v.clone() for k, v in base.state_dict().items()}
    pixels = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        penalty = feature_preservation(torch.nn.functional.normalize(visual(pixels), dim=-1),
                                       torch.nn.functional.normalize(train_mod._like(base, visual)(pixels), dim=-1))
    assert penalty.item() == 0.0
    assert all(torch.equal(stats[k], v) for k, v in base.state_dict().items() if "num_batches" not in k)
    assert not any(p.requires_grad for p in base.parameters())
