"""Discover-then-Name: the SAE, naming, ground-truth scoring and the sparse concept probe."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from conceptlab import dncbm
from conceptlab.chapter import differences_table
from conceptlab.chapters import dncbm as chapter
from conceptlab.dncbm import ProbeConfig, probe_l1_term
from conceptlab.models import images_to_tensor
from conceptlab.sae import (
    SAEConfig,
    SparseAutoencoder,
    encode_concepts,
    l1_on_original_scale,
    load_or_train_sae,
    resample_dead,
    sae_loss,
    sae_step_gradients,
    train_sae,
)
from conceptlab.world import ATTRIBUTES, PARTS


def planted_dictionary(n: int = 6000, dim: int = 16, atoms: int = 24, seed: int = 0):
    """Inputs that are sums of two of ``atoms`` unit directions with positive strengths."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, dim, generator=g), dim=-1)
    codes = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:2] for _ in range(n)])
    codes.scatter_(1, idx, 0.5 + torch.rand(n, 2, generator=g))
    return codes @ dictionary, dictionary


def test_sae_loss_is_the_mean_reduced_formula_of_the_original_code():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    # squared errors per input (1, 0) and (0, 9): means 0.5 and 4.5 -> 2.5; L1 per input 3 and 0 -> 1.5
    loss, rec, l1 = sae_loss(x, x_hat, z, l1=0.5)
    assert (loss.item(), rec.item(), l1.item()) == (3.25, 2.5, 1.5)
    loss_sum, rec_sum, _ = sae_loss(x, x_hat, z, l1=0.5, reconstruction="sum")  # sums 1 and 9 -> 5
    assert (loss_sum.item(), rec_sum.item()) == (5.75, 5.0)
    # the paper's sum with l1 * D is D times the code's mean with l1: the same minimiser
    torch.testing.assert_close(sae_loss(x, x_hat, z, 0.5 * 2, "sum")[0], 2 * sae_loss(x, x_hat, z, 0.5)[0])
    assert l1_on_original_scale(0.5 * 2, "sum", 2) == 0.5 and l1_on_original_scale(0.5, "mean", 2) == 0.5


@pytest.mark.parametrize("reconstruction", ["mean", "sum"])
def test_written_out_sae_gradients_are_autograds_on_sae_loss(reconstruction):
    """The training step's gradients are those of :func:`sae_loss` (the loss the chapter shows), for both
    reductions, with some concepts off (ReLU at zero) and a decoder bias away from zero."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(6, 24)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6))
        sae.b_enc.copy_(torch.randn(24))
    x = torch.randn(32, 6)
    x_hat, z = sae(x)
    loss, rec, l1 = sae_loss(x, x_hat, z, 0.3, reconstruction)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in sae.named_parameters()}
    assert 0 < (z == 0).float().mean() < 1, "some concepts are off, some on"
    got_x_hat, got_z, got_rec, got_l1 = sae_step_gradients(sae, x, 0.3, reconstruction)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(got_x_hat, x_hat.detach())
    torch.testing.assert_close(torch.stack([got_rec, got_l1]), torch.stack([rec, l1]).detach())


def test_sae_recovers_a_planted_dictionary():
    x, dictionary = planted_dictionary()
    sae, history = train_sae(
        x,
        SAEConfig(expansion=4, l1=0.3 / 16, lr=5e-3, batch_size=128, epochs=20, resample_every=4),
        progress=False,
        device="cpu",
    )
    torch.testing.assert_close(sae.directions.norm(dim=1), torch.ones(sae.n_concepts))
    best = (dictionary @ sae.directions.T).max(1).values
    assert (best > 0.9).float().mean() >= 0.9, best
    assert history[-1]["fvu"] < 0.1 and history[-1]["fvu"] < history[0]["fvu"]
    assert history[-1]["l0"] < 12  # sparse: far fewer than the 64 units are active per input


def test_sae_switches_change_the_result():
    x, _ = planted_dictionary(n=1024)
    cfg = SAEConfig(expansion=2, l1=1e-2, lr=1e-2, batch_size=256, epochs=3, resample_every=0)
    mean, h_mean = train_sae(x, cfg, progress=False)
    summed, h_sum = train_sae(x, SAEConfig(**{**cfg.__dict__, "reconstruction": "sum"}), progress=False)
    assert not torch.allclose(mean.W_dec, summed.W_dec)
    assert h_mean[-1]["l0"] != h_sum[-1]["l0"]
    scaled = x * 3
    assert torch.equal(dncbm.sae_inputs(scaled, "raw"), scaled)
    torch.testing.assert_close(dncbm.sae_inputs(scaled, "normalised"), F.normalize(x, dim=-1))
    with pytest.raises(ValueError, match="reconstruction"):
        SAEConfig(reconstruction="median")


def test_decoder_bias_at_the_mean_saves_a_short_run_the_offset():
    x, _ = planted_dictionary(n=1024)
    x = x + 5.0  # a large common offset, as raw CLIP embeddings have
    cfg = SAEConfig(expansion=2, l1=1e-3, lr=5e-4, batch_size=128, epochs=2, resample_every=0)
    zero, h_zero = train_sae(x, cfg, progress=False)
    mean, h_mean = train_sae(x, SAEConfig(**{**cfg.__dict__, "decoder_bias_init": "mean"}), progress=False)
    assert h_mean[-1]["fvu"] < 0.5 * h_zero[-1]["fvu"]
    assert (zero.b_dec - x.mean(0)).norm() > (mean.b_dec - x.mean(0)).norm()
    with pytest.raises(ValueError, match="decoder_bias_init"):
        SAEConfig(decoder_bias_init="median")


def test_resampling_revives_dead_concepts():
    x, _ = planted_dictionary(n=512)
    sae = SparseAutoencoder(16, 32)
    opt = torch.optim.Adam(sae.parameters())
    sae(x)[0].pow(2).sum().backward()
    opt.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::2] = True
    with torch.no_grad():
        sae.b_enc[dead] = -100.0
    assert not (encode_concepts(sae, x)[:, dead] > 0).any()
    assert resample_dead(sae, opt, x, dead, torch.Generator().manual_seed(0)) == 16
    assert (encode_concepts(sae, x)[:, dead] > 0).any(0).all()
    torch.testing.assert_close(sae.W_dec[:, dead].norm(dim=0), torch.ones(16))
    assert opt.state[sae.W_enc]["exp_avg"][dead].abs().sum() == 0
    assert opt.state[sae.W_enc]["exp_avg"][~dead].abs().sum() > 0


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    x, _ = planted_dictionary(n=1024)
    cfg = SAEConfig(expansion=2, l1=1e-3, lr=1e-2, batch_size=256, epochs=6, resample_every=3)
    reference, _ = train_sae(x, cfg, tmp_path / "a", progress=False, checkpoint_seconds=0)

    def interrupt(epoch: int) -> None:
        if epoch == 3:  # after the resampling of epoch 2: the resumed run must remember what fired
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(x, cfg, tmp_path / "b", progress=False, checkpoint_seconds=3600, on_epoch=interrupt)
    assert (tmp_path / "b" / "state.pt").exists()  # saved on the interrupt, not by the clock
    resumed, history = train_sae(x, cfg, tmp_path / "b", progress=False, checkpoint_seconds=3600)
    assert [h["epoch"] for h in history] == list(range(6))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)


def test_sae_store_keys_by_content(tiny_store):
    x, _ = planted_dictionary(n=512)
    cfg = SAEConfig(expansion=2, batch_size=128, epochs=2, resample_every=0)
    a, _ = load_or_train_sae(tiny_store, x, cfg, progress=False)
    b, _ = load_or_train_sae(tiny_store, x.clone(), cfg, progress=False)  # same content: loaded
    c, _ = load_or_train_sae(tiny_store, x + 1e-3, cfg, progress=False)  # other features: trained anew
    d, _ = load_or_train_sae(tiny_store, x, SAEConfig(**{**cfg.__dict__, "epochs": 3}), progress=False)
    torch.testing.assert_close(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, c.W_dec) and not torch.equal(a.W_dec, d.W_dec)
    with pytest.raises(ValueError, match="expansion"):
        SAEConfig(expansion=0)


def test_auroc_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    truths = rng.random((3, 200)) < 0.3
    scores = np.round(rng.random((200, 4)) + truths[0][:, None] * np.array([1, 0, 0.2, 0]), 1)  # ties included
    truths[2] = False  # a constant truth has no AUROC
    auc = dncbm.auroc_matrix(scores, truths)
    for w in range(2):
        for k in range(4):
            assert auc[w, k] == pytest.approx(roc_auc_score(truths[w], scores[:, k]))
    assert np.isnan(auc[2]).all()


def test_word_truth_follows_the_ground_truth(tiny_world):
    batch = tiny_world.sample(300, split="test")
    gt = {k: getattr(batch, k) for k in dncbm.GROUND_TRUTH_KEYS}
    red = [any(a["colour"] == "red" for a in batch.part_attributes(i).values()) for i in range(len(batch))]
    np.testing.assert_array_equal(dncbm.word_truth("red", gt, tiny_world.class_names), red)
    striped = [any(a["pattern"] == "striped" for a in batch.part_attributes(i).values()) for i in range(len(batch))]
    np.testing.assert_array_equal(dncbm.word_truth("striped", gt, tiny_world.class_names), striped)
    np.testing.assert_array_equal(
        dncbm.word_truth("wings", gt, tiny_world.class_names),
        ["wings" in batch.part_attributes(i) for i in range(len(batch))],
    )
    name = tiny_world.class_names[2]
    np.testing.assert_array_equal(dncbm.word_truth(name, gt, tiny_world.class_names), batch.labels == 2)
    assert dncbm.word_truth("piano", gt, tiny_world.class_names) is None
    vocab = dncbm.world_vocabulary(tiny_world)
    assert set(tiny_world.class_names) | set(PARTS) | set(ATTRIBUTES["colour"]) <= set(vocab)
    assert not set(dncbm.DISTRACTORS) & set(dncbm.world_words(tiny_world.class_names))


def test_score_names_finds_right_wrong_dead_and_duplicate(tiny_world):
    batch = tiny_world.sample(400, split="test")
    gt = {k: getattr(batch, k) for k in dncbm.GROUND_TRUTH_KEYS}
    red = dncbm.word_truth("red", gt, tiny_world.class_names)
    rng = np.random.default_rng(0)
    acts = np.stack(
        [
            red * (1 + rng.random(400)),  # a red detector
            red * (1 + rng.random(400)),  # the same, named wrongly
            np.zeros(400),  # dead
            rng.random(400) * red,  # a duplicate direction of concept 0
            rng.random(400),
        ],
        1,
    )  # noise named "car"
    dirs = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    dirs[3] = dirs[0]
    names = pd.DataFrame({"concept": range(5), "name": ["red", "desert", "red", "red", "car"]})
    s = dncbm.score_names(torch.tensor(acts, dtype=torch.float32), names, gt, tiny_world.class_names, dirs)
    assert s["right"].tolist() == [True, False, False, True, False]
    assert s["dead"].tolist() == [False, False, True, False, False]
    assert s["duplicate"].tolist() == [False, False, False, True, False]
    assert s.loc[1, "best_word"] == "red" and s.loc[1, "best_auroc"] > 0.95 and s.loc[1, "auroc"] < 0.75
    assert s.loc[4, "kind"] == "no ground truth" and np.isnan(s.loc[4, "auroc"])
    assert s.loc[0, "top_precision"] == 1.0 and s.loc[3, "top_precision"] == 1.0  # top images of a red detector
    assert np.isnan(s.loc[2, "top_precision"]) and np.isnan(s.loc[4, "top_precision"])
    summary = dncbm.summarise_scores(s)
    assert summary["dead"] == 1 and summary["duplicates"] == 1 and summary["share_right"] == pytest.approx(0.5)


def test_names_are_the_nearest_words(tiny_clip):
    model, _, tokenizer, _ = tiny_clip
    words = ["red", "striped", "forest", "car", "head"]
    emb = dncbm.embed_vocabulary(model, tokenizer, words)
    dirs = emb[[3, 0, 4]] + 0.01 * torch.randn(3, emb.shape[1])
    names = dncbm.name_concepts(dirs, emb, words)
    assert names["name"].tolist() == ["car", "red", "head"]
    assert (names["similarity"] > 0.9).all() and (names["margin"] > 0).all()
    with pytest.raises(ValueError, match="word embeddings"):
        dncbm.name_concepts(dirs, emb[:2], words)


def test_load_vocabulary(tmp_path):
    path = tmp_path / "20k.txt"
    path.write_text("# a comment\nred\n\n  striped \nred\nsea turtle\n")
    assert dncbm.load_vocabulary(path) == ["red", "striped", "sea turtle"]
    with pytest.raises(FileNotFoundError, match="one word per line"):
        dncbm.load_vocabulary(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no words"):
        dncbm.load_vocabulary(tmp_path / "empty.txt")


def test_probe_l1_is_the_mean_of_the_original_code():
    w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -0.5]])
    assert probe_l1_term(w).item() == pytest.approx(4.0 / 6)
    assert probe_l1_term(w).item() == nn.L1Loss()(w.flatten(), torch.zeros(6)).item()
    assert probe_l1_term(w, "sum").item() == 4.0
    logits, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    ce = F.cross_entropy(logits, labels).item()
    assert dncbm.probe_loss(logits, labels, w, 0.1).item() == pytest.approx(ce + 0.1 * 4.0 / 6)


def concept_data(n: int = 600, k: int = 30, seed: int = 0):
    """Concepts 0..2 carry the class of 3; the other 27 are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(3, size=n)
    x = rng.random((n, k)) * 0.3
    x[np.arange(n), y] += 1.0
    return x, y


def test_probe_switches_change_the_weights():
    x, y = concept_data()
    adam = dncbm.fit_probe(x, y, ProbeConfig(lam=0.1, epochs=50), device="cpu")
    assert adam.score(x, y) > 0.95
    assert adam.coef_.shape == (3, 30)
    summed = dncbm.fit_probe(x, y, ProbeConfig(lam=0.1, l1="sum", epochs=50))
    assert not np.allclose(adam.coef_, summed.coef_)
    assert np.abs(summed.coef_).sum() < np.abs(adam.coef_).sum()  # the sum penalises 90 times harder
    fista = dncbm.fit_probe(x, y, ProbeConfig(lam=0.01, l1="sum", solver="fista", epochs=300))
    assert dncbm.nonzero_per_class(fista) <= 5 and fista.score(x, y) > 0.95  # exact zeros
    assert dncbm.nonzero_per_class(adam) == 30  # Adam leaves every weight slightly off zero
    assert all(np.argmax(fista.coef_[c]) == c for c in range(3))
    weak = dncbm.fit_probe(x, y, ProbeConfig(lam=0.01, solver="fista", epochs=300))  # mean: 90 times weaker
    assert dncbm.nonzero_per_class(weak) > dncbm.nonzero_per_class(fista)


def test_explanations_of_the_probe():
    x, y = concept_data()
    probe = dncbm.LinearProbe(np.eye(3, 30) * 2.0 + 0.01)
    names = [f"c{i}" for i in range(30)]
    expl = dncbm.local_explanation(x[0], probe, names, k=30)
    np.testing.assert_allclose(expl["contribution"], expl["strength"] * expl["weight"])
    assert expl["contribution"].sum() == pytest.approx(probe.decision_function(x[:1])[0, y[0]])
    glob = dncbm.global_explanation(probe, names, ["a", "b", "c"], k=1)
    assert glob["name"].tolist() == ["c0", "c1", "c2"]
    # contributions 20.1 (the class's concept) and 27 x 0.01: the first alone passes 90 % of 20.37
    assert dncbm.concepts_per_decision(np.eye(3, 30) * 10 + 1.0 * (np.arange(30) >= 3), probe) == 1.0
    assert dncbm.concepts_per_decision(np.ones((1, 30)), dncbm.LinearProbe(np.ones((3, 30)))) == 27.0


def test_global_ranking_by_mean_strength_is_centred_on_all_images():
    labels = np.array([0, 0, 1, 1])
    z = np.array([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [5.0, 0.0, 1.0], [5.0, 0.0, 3.0]])
    glob = dncbm.global_explanation_by_strength(z, labels, ["always", "one", "two"], ["A", "B"], k=1)
    # concept 0 is strongest everywhere but says nothing about a class: centring ranks it last
    assert glob["name"].tolist() == ["one", "two"]
    assert glob["score"].tolist() == pytest.approx([0.5, 1.0])
    by_weight = dncbm.global_explanation(
        dncbm.LinearProbe(np.array([[0.0, 1, 0], [1.0, 0, 0]])), ["always", "one", "two"], ["A", "B"], k=1
    )
    both = dncbm.rankings_side_by_side(by_weight, glob)
    assert both["shared concepts"].tolist() == [1, 0]
    assert both.loc["B", "by probe weight"] == "always" and both.loc["B", "by mean strength (original)"] == "two"


def test_world_features_are_raw_and_cached_with_ground_truth(tiny_world, tiny_clip, tiny_store, monkeypatch):
    model = tiny_clip[0]
    key = {"model": "tiny"}
    first = dncbm.world_features(tiny_store, tiny_world, model, key, 300, "corpus", batch_size=128, progress=False)
    batch = tiny_world.sample(300, split="corpus")
    np.testing.assert_array_equal(first["labels"].numpy(), batch.labels)
    np.testing.assert_array_equal(first["attributes"].numpy(), batch.attributes)
    with torch.no_grad():
        raw = model.encode_image(images_to_tensor(batch.images[:5], model))
    torch.testing.assert_close(first["features"][:5], raw)
    assert not torch.allclose(first["features"].norm(dim=-1), torch.ones(300))  # not normalised

    def no_encoding(*args, **kwargs):
        raise RuntimeError("encoded again")

    monkeypatch.setattr(dncbm, "embed_images", no_encoding)
    again = dncbm.world_features(tiny_store, tiny_world, model, key, 300, "corpus", progress=False)
    torch.testing.assert_close(again["features"], first["features"])
    with pytest.raises(RuntimeError, match="encoded again"):  # other parameters: not the cached file
        dncbm.world_features(tiny_store, tiny_world, model, key, 200, "corpus", progress=False)
    with pytest.raises(RuntimeError, match="encoded again"):  # another CLIP: not the cached file
        dncbm.world_features(tiny_store, tiny_world, model, {"model": "other"}, 300, "corpus", progress=False)


def test_switches_record_the_original_and_the_scales():
    params = {name: p.default for name, p in chapter.PARAMETERS.items()} | {"seed": 0}
    changes = chapter.original_changes(params)
    assert changes["sae_scale"] == "raw" and changes["sae_l1"] == 3e-5  # the defaults depart from the original
    assert "sae_epochs" not in changes  # the chapter's training length is kept
    assert chapter.original_changes({**params, **changes}) == {}  # the original's settings need no change
    changed = {**params, "sae_l1": 1e-3, "sae_reconstruction": "sum", "sae_scale": "raw"}
    assert chapter.original_changes(changed)["sae_reconstruction"] == "mean"
    scales = chapter.original_scale(changed, dim=128, scale=1.0)
    assert scales["sae_l1_original_scale"] == pytest.approx(1e-3 / 128)
    # features scaled by 4: the same coefficient is 4 times weaker on the raw features
    scaled = chapter.original_scale({**changed, "sae_reconstruction": "mean"}, dim=128, scale=4.0)
    assert scaled["sae_l1_original_scale"] == pytest.approx(1e-3 / 4)
    assert scaled["probe_lambda_original_scale"] == pytest.approx(params["probe_lambda"] / 4)
    table = differences_table(chapter.SWITCHES, changed)
    assert table.loc["sae_reconstruction", "this run follows"] == "paper"
    assert table.loc["sae_l1", "this run follows"] == "neither"
    assert table.loc["probe_l1", "this run follows"] == "original code"
    assert table.loc["sae_scale", "this run follows"] == "paper and original code"


def test_default_probe_config_is_the_chapters():
    cfg = chapter.default_probe_config()
    assert cfg == chapter.probe_config({k: p.default for k, p in chapter.PARAMETERS.items()} | {"seed": 0})
    assert cfg.lam == chapter.PARAMETERS["probe_lambda"].default and cfg.solver == "adam"


def test_rescaling_changes_the_effective_l1_as_stated():
    """Features times c with λ are features with λ / c: c^2 times the same loss, for the SAE and the probe."""
    g = torch.Generator().manual_seed(0)
    x, x_hat, z = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.rand(5, 16, generator=g)
    c, lam = 3.0, 0.2
    scaled = sae_loss(c * x, c * x_hat, c * z, lam)[0]
    torch.testing.assert_close(scaled, c**2 * sae_loss(x, x_hat, z, dncbm.raw_scale_coefficient(lam, c))[0])
    assert not torch.allclose(scaled, c**2 * sae_loss(x, x_hat, z, lam)[0])  # the same λ is not the same loss
    w = torch.randn(3, 16, generator=g)  # probe: logits W (c z) = (c W) z, so λ|W| = (λ / c)|c W|
    torch.testing.assert_close(
        dncbm.probe_loss((c * z) @ w.T, torch.tensor([0, 1, 2, 0, 1]), w, lam),
        dncbm.probe_loss(z @ (c * w).T, torch.tensor([0, 1, 2, 0, 1]), c * w, lam / c),
    )
    features = 7.0 * torch.randn(500, 32, generator=g)
    unit = dncbm.feature_scale(features, "unit_rms")
    assert (unit * features).pow(2).sum(-1).mean().item() == pytest.approx(32, rel=1e-4)
    assert unit == pytest.approx(1 / 7, rel=0.05) and dncbm.feature_scale(features, "raw") == 1.0
    torch.testing.assert_close(dncbm.sae_inputs(features, "raw", unit), features * unit)
    with pytest.raises(ValueError, match="feature scale"):
        dncbm.feature_scale(features, "l2")


def test_sweep_l0_decreases_with_l1_on_a_known_sparse_code():
    x, _ = planted_dictionary(n=2048)  # every input: two active atoms of 24
    l0 = [
        train_sae(
            x,
            SAEConfig(expansion=2, l1=l1, lr=5e-3, batch_size=128, epochs=6, resample_every=0, seed=0),
            progress=False,
        )[1][-1]["l0"]
        for l1 in (1e-4, 3e-3, 3e-2)
    ]
    assert l0[0] > l0[1] > l0[2], l0
    assert l0[2] < 12  # a quarter of the 48 units: the strongest λ₁ gives a sparse code


def test_a_number_for_the_probe_is_the_summed_l1_by_fista():
    x, y = concept_data()
    probe = dncbm.fit_probe(x, y, 0.01)
    assert dncbm.nonzero_per_class(probe) <= 5 and probe.score(x, y) > 0.95


def test_nulls_put_the_shares_beside_chance(tiny_world):
    batch = tiny_world.sample(400, split="test")
    gt = {k: getattr(batch, k) for k in dncbm.GROUND_TRUTH_KEYS}
    words = [
        w
        for w in dncbm.world_words(tiny_world.class_names)
        if 0.1 < dncbm.word_truth(w, gt, tiny_world.class_names).mean() < 0.9
    ][:12]
    rng = np.random.default_rng(0)
    truth = np.stack([dncbm.word_truth(w, gt, tiny_world.class_names) for w in words], 1)
    detectors = torch.tensor(truth * (1 + rng.random(truth.shape)), dtype=torch.float32)  # each detects its word
    names = pd.DataFrame({"concept": range(len(words)), "name": words})
    dirs = F.normalize(torch.randn(len(words), 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    observed = dncbm.summarise_scores(dncbm.score_names(detectors, names, gt, tiny_world.class_names, dirs))
    nulls = dncbm.name_score_nulls(detectors, names, gt, tiny_world.class_names, n_draws=30)
    assert observed["share_right"] == 1.0 and nulls["share_right"].max() < 0.6  # shuffled names are mostly wrong
    assert nulls["share_oracle_detects_something"].mean() < 0.3  # shuffled images: nothing detected
    noise = torch.rand(400, len(words), generator=torch.Generator().manual_seed(1))
    noise_observed = dncbm.summarise_scores(dncbm.score_names(noise, names, gt, tiny_world.class_names, dirs))
    noise_nulls = dncbm.name_score_nulls(noise, names, gt, tiny_world.class_names, n_draws=30)
    band = noise_nulls["share_oracle_detects_something"]
    assert band.min() - 0.2 <= noise_observed["share_oracle_detects_something"] <= band.max() + 0.2


def test_local_truth_checks_each_explanation_against_its_image(tiny_world):
    batch = tiny_world.sample(300, split="test")
    gt = {k: getattr(batch, k) for k in dncbm.GROUND_TRUTH_KEYS}
    cls = tiny_world.class_names
    red, habitat = dncbm.word_truth("red", gt, cls), dncbm.word_truth(dncbm.HABITATS[0], gt, cls)
    z = np.stack([red * 2.0, habitat * 1.0, np.ones(300) * 0.5], 1)  # "red", a habitat, a distractor
    probe = dncbm.LinearProbe(np.ones((2, 3)))
    true = dncbm.local_truth(z, probe, ["red", dncbm.HABITATS[0], "piano"], gt, cls, k=2)
    expected = np.where(red | habitat, 1.0, np.nan)  # only names whose concept fires are in the explanation
    np.testing.assert_array_equal(np.isnan(true), np.isnan(expected))
    assert np.nanmin(true) == 1.0  # a concept fires exactly where its word is true
    shuffled = dncbm.local_truth(
        z,
        probe,
        ["red", dncbm.HABITATS[0], "piano"],
        gt,
        cls,
        k=2,
        permutation=np.random.default_rng(0).permutation(300),
    )
    assert np.nanmean(shuffled) < 0.8


def test_ranking_overlap_counts_concepts_and_names():
    by_weight = pd.DataFrame({"class": ["A", "A", "B", "B"], "concept": [0, 1, 2, 3], "name": ["x", "y", "x", "z"]})
    by_strength = pd.DataFrame({"class": ["A", "A", "B", "B"], "concept": [0, 5, 4, 3], "name": ["x", "y", "x", "z"]})
    np.testing.assert_array_equal(dncbm.ranking_overlap(by_weight, by_strength, "concept"), [[1, 0], [0, 1]])
    # concepts 1 and 5 are both named "y", 2 and 4 both "x": the names agree where the concepts do not
    np.testing.assert_array_equal(dncbm.ranking_overlap(by_weight, by_strength, "name"), [[2, 1], [1, 2]])
    side = dncbm.rankings_side_by_side(by_weight, by_strength)
    assert side["shared concepts"].tolist() == [1, 1] and side["shared names"].tolist() == [2, 2]


def test_decision_sizes_average_to_concepts_per_decision():
    x, y = concept_data()
    probe = dncbm.fit_probe(x, y, ProbeConfig(lam=0.01, l1="sum", solver="fista", epochs=200))
    sizes = dncbm.decision_sizes(x, probe)
    assert sizes.shape == (len(x),) and sizes.mean() == dncbm.concepts_per_decision(x, probe)
    assert set(np.unique(sizes)) <= set(range(1, 31))


def test_the_sweeps_rule_takes_the_sparsest_setting_within_tolerance_that_kills_few_concepts():
    from conceptlab.chapters.dncbm import DEAD_LIMIT, rule_choice

    table = pd.DataFrame(
        {"accuracy_concept_probe": [0.93, 0.928, 0.922, 0.54], "dead_concepts": [0, 22, 82, 67]},
        index=pd.Index([0.005, 0.01, 0.02, 0.05], name="sae_l1"),
    )
    assert rule_choice(table, 0.925, 0.01) == 0.02, "accuracy alone: the sparsest within a point"
    assert rule_choice(table, 0.925, 0.01, n_concepts=1024) == 0.01, f"0.02 kills {82 / 1024:.0%} > {DEAD_LIMIT:.0%}"
    assert rule_choice(table, 0.99, 0.01, n_concepts=1024) == 0.005, "none qualifies: the most accurate"


@pytest.mark.parametrize("l1", ["mean", "sum"])
def test_adam_probe_follows_autograd_on_its_loss(l1):
    """The probe's written-out gradient is :func:`probe_loss`'s: the original's loop, with autograd on the
    same loss, the same initialisation and the same batch order, reaches the same weights."""
    x, y = torch.randn(70, 12), torch.randint(0, 3, (70,))
    cfg = dncbm.ProbeConfig(lam=0.5, l1=l1, epochs=6, batch_size=16)
    torch.manual_seed(cfg.seed)
    linear = torch.nn.Linear(12, 3, bias=False)
    opt = torch.optim.Adam(linear.parameters(), lr=cfg.lr)
    for epoch in range(cfg.epochs):
        for idx in torch.randperm(70, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).split(16):
            loss = dncbm.probe_loss(linear(x[idx]), y[idx], linear.weight, cfg.lam, l1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    fitted = dncbm.fit_probe(x, y, cfg, 3).coef_
    assert np.abs(fitted - linear.weight.detach().double().numpy()).max() < 1e-5
    assert np.abs(fitted - dncbm.fit_probe(x, y, dncbm.ProbeConfig(lam=0.0, epochs=6), 3).coef_).max() > 1e-3, (
        "the L1 term must move the weights"
    )


def test_probes_fitted_together_are_the_probes_fitted_alone():
    """A sweep's probes share one loop (stacked weights); each must be the probe its own fit gives."""
    x, y = torch.randn(70, 12), torch.randint(0, 3, (70,))
    cfgs = [ProbeConfig(lam=lam, epochs=4, batch_size=16) for lam in (0.0, 1.0, 5.0)]
    cfgs.append(ProbeConfig(lam=0.01, l1="sum", solver="fista", epochs=50))
    xs = [x, 2 * x, x, x]
    together = dncbm.fit_probes(xs, y, cfgs, 3)
    for xi, cfg, probe in zip(xs, cfgs, together):
        assert np.abs(probe.coef_ - dncbm.fit_probe(xi, y, cfg, 3).coef_).max() < 1e-5
    assert np.abs(together[0].coef_ - together[2].coef_).max() > 1e-3, "each probe keeps its own λ"


def test_the_habitat_gap_is_paired_over_test_images_and_its_direction_is_said():
    """The second task's gap gets a paired interval like the class task's, and the sentence reads its sign."""
    from types import SimpleNamespace

    n = 400
    r = chapter.Result()
    r.strengths = {"test": torch.rand(n, 4)}
    r.probe = dncbm.LinearProbe(np.eye(2, 4))
    always = np.ones(n, dtype=bool)
    r.correct = {"concept probe": always, "raw probe": always}
    r.correct["habitat concept probe"] = np.arange(n) % 10 != 0  # 90 % right
    r.correct["habitat raw probe"] = always
    block = chapter.accuracy_blocks(SimpleNamespace(params={"seed": 0}), r)["habitat_gap_to_raw_probe"]
    assert block["value"] == pytest.approx(-0.1) and block["low"] <= block["value"] <= block["high"] < 0
    assert "loses accuracy beyond the interval" in chapter.habitat_sentence(0.9, 1.0, block)
    assert "90.0%" in chapter.habitat_sentence(0.9, 1.0, block)
    gain = {"value": 0.1, "low": 0.05, "high": 0.15}
    assert "gains accuracy beyond the interval" in chapter.habitat_sentence(1.0, 0.9, gain)
    noise = {"value": -0.004, "low": -0.01, "high": 0.003}
    assert "within noise" in chapter.habitat_sentence(0.95, 0.954, noise)
    assert "loses" not in chapter.habitat_sentence(0.95, 0.954, noise)
    del r.correct["habitat concept probe"], r.correct["habitat raw probe"]
    assert "habitat_gap_to_raw_probe" not in chapter.accuracy_blocks(SimpleNamespace(params={"seed": 0}), r)


def test_the_original_codes_share_of_right_names_is_placed_against_the_books():
    book = {"value": 0.103, "low": 0.086, "high": 0.122}

    def original(value: float, low: float, high: float) -> dict[str, float]:
        return {"share_right": value, "share_right_low": low, "share_right_high": high}

    higher = chapter.original_names_sentence(book, original(0.271, 0.24, 0.30))
    assert "27.1% (24.0%–30.0%)" in higher and "higher than this book's 10.3%" in higher
    assert "do not overlap" in higher
    lower = chapter.original_names_sentence(book, original(0.05, 0.03, 0.07))
    assert "lower than this book's" in lower and "do not overlap" in lower
    close = chapter.original_names_sentence(book, original(0.13, 0.11, 0.15))
    assert "higher than" in close and "overlap, so this is no finding" in close
    assert "equal to" in chapter.original_names_sentence(book, original(0.103, 0.09, 0.12))


def test_operating_points_are_kept_so_a_repeated_point_is_read_not_recomputed(tiny_store, tmp_path, monkeypatch):
    from conceptlab import chapters
    from conceptlab.bookrun import smoke_parameters

    small = {"n_corpus": 256, "n_probe_train": 64, "n_test": 64, "sae_epochs": 1, "probe_epochs": 2}
    params = {**smoke_parameters(chapter.NAME, tmp_path), **small, "artifacts_dir": str(tiny_store.root)}
    ch = chapters.start(chapter.NAME, params)
    data = chapter.chapter_features(ch, progress=False)
    computed, compute = [], chapter._compute_points

    def counted(chs, data, progress=False):
        computed.append([(c.params["sae_l1"], c.params["probe_lambda"]) for c in chs])
        return compute(chs, data, progress)

    monkeypatch.setattr(chapter, "_compute_points", counted)
    sweep = chapter.evaluate_many([ch.with_params(sae_l1=v) for v in (0.01, 0.02)], data)
    assert computed == [[(0.01, ch.params["probe_lambda"]), (0.02, ch.params["probe_lambda"])]], "one batch"
    assert chapter.evaluate(ch.with_params(sae_l1=0.02), data) == sweep[1], "a sweep's point, read back"
    assert len(computed) == 1
    chapter.evaluate(ch.with_params(sae_l1=0.02, probe_lambda=1.0), data)  # another probe: computed
    assert computed[-1] == [(0.02, 1.0)]
    test = {**data[2], "labels": data[2]["labels"].roll(1)}  # other test labels: computed
    chapter.evaluate(ch.with_params(sae_l1=0.02), (data[0], data[1], test, data[3]))
    assert len(computed) == 3
    edited = {path: "edited" for path in (chapter.__file__, dncbm.__file__)}  # the code that computes a point
    monkeypatch.setattr(type(ch.store), "fingerprint", lambda self, path: edited.get(str(path), "same"))
    chapter.evaluate(ch.with_params(sae_l1=0.02), data)
    assert len(computed) == 4, "a point computed by other code is computed again"
