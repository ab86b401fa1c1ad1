"""Discover-then-Name: the SAE, naming, ground-truth scoring and the sparse concept probe."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from conceptlab import dncbm
from conceptlab.models import TrainConfig
from conceptlab.sae import SAEConfig, SparseAutoencoder, encode_concepts, load_or_train_sae, resample_dead, train_sae
from conceptlab.world import ATTRIBUTES, PARTS


def planted_dictionary(n: int = 6000, dim: int = 16, atoms: int = 24, seed: int = 0):
    """Inputs that are sums of two of ``atoms`` unit directions with positive strengths."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, dim, generator=g), dim=-1)
    codes = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:2] for _ in range(n)])
    codes.scatter_(1, idx, 0.5 + torch.rand(n, 2, generator=g))
    return codes @ dictionary, dictionary


def test_sae_recovers_a_planted_dictionary():
    x, dictionary = planted_dictionary()
    sae, history = train_sae(x, SAEConfig(expansion=4, l1=0.3, lr=5e-3, batch_size=128, epochs=12,
                                          resample_every=4), progress=False)
    torch.testing.assert_close(sae.directions.norm(dim=1), torch.ones(sae.n_concepts))
    best = (dictionary @ sae.directions.T).max(1).values
    assert (best > 0.9).float().mean() >= 0.9, best
    assert history[-1]["fvu"] < 0.1 and history[-1]["fvu"] < history[0]["fvu"]
    assert history[-1]["l0"] < 12  # sparse: far fewer than the 64 units are active per input


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
    reference, _ = train_sae(x, cfg, tmp_path / "a", progress=False, checkpoint_every=1)

    def interrupt(epoch: int) -> None:
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(x, cfg, tmp_path / "b", progress=False, checkpoint_every=2, on_epoch=interrupt)
    resumed, history = train_sae(x, cfg, tmp_path / "b", progress=False, checkpoint_every=2)
    assert [h["epoch"] for h in history] == list(range(6))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)


def test_sae_store_reuses_only_matching_parameters(tiny_store):
    x, _ = planted_dictionary(n=512)
    cfg = SAEConfig(expansion=2, batch_size=128, epochs=2, resample_every=0)
    a, _ = load_or_train_sae(tiny_store, x, {"data": "planted"}, cfg, progress=False)
    b, _ = load_or_train_sae(tiny_store, x * 0 + 1, {"data": "planted"}, cfg, progress=False)  # same key: loaded
    c, _ = load_or_train_sae(tiny_store, x, {"data": "planted"}, SAEConfig(expansion=2, batch_size=128, epochs=3,
                                                                           resample_every=0), progress=False)
    torch.testing.assert_close(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, c.W_dec)
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
    np.testing.assert_array_equal(dncbm.word_truth("wings", gt, tiny_world.class_names),
                                  ["wings" in batch.part_attributes(i) for i in range(len(batch))])
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
    acts = np.stack([red * (1 + rng.random(400)),  # a red detector
                     red * (1 + rng.random(400)),  # the same, named wrongly
                     np.zeros(400),  # dead
                     rng.random(400) * red,  # a duplicate direction of concept 0
                     rng.random(400)], 1)  # noise named "car"
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


def test_sparse_probe_is_sparse_and_explains_its_decisions():
    rng = np.random.default_rng(0)
    y = rng.integers(3, size=600)
    x = rng.random((600, 30)) * 0.3
    x[np.arange(600), y] += 1.0  # concepts 0..2 carry the class; 27 are noise
    dense = dncbm.fit_probe(x, y, 0.0)
    sparse = dncbm.fit_probe(x, y, 0.02)
    assert dncbm.nonzero_per_class(dense) == 30
    assert dncbm.nonzero_per_class(sparse) <= 5
    assert sparse.score(x, y) > 0.95
    assert all(set(np.argsort(-sparse.coef_[c])[:1]) == {c} for c in range(3))
    expl = dncbm.local_explanation(x[0], sparse, [f"c{i}" for i in range(30)], k=30)
    np.testing.assert_allclose(expl["contribution"], expl["strength"] * expl["weight"])
    assert expl["contribution"].sum() + sparse.intercept_[y[0]] == pytest.approx(sparse.decision_function(x[:1])[0,
                                                                                                               y[0]])
    glob = dncbm.global_explanation(sparse, [f"c{i}" for i in range(30)], ["a", "b", "c"], k=1)
    assert glob["name"].tolist() == ["c0", "c1", "c2"]


def test_world_features_are_cached_with_ground_truth(tiny_world, tiny_clip, tiny_store, monkeypatch):
    model = tiny_clip[0]
    key = {"train": TrainConfig(n_train=512, steps=20, batch_size=32, warmup=5).__dict__}
    first = dncbm.world_features(tiny_store, tiny_world, model, key, 300, "corpus", batch_size=128, progress=False)
    batch = tiny_world.sample(300, split="corpus")
    np.testing.assert_array_equal(first["labels"].numpy(), batch.labels)
    np.testing.assert_array_equal(first["attributes"].numpy(), batch.attributes)
    torch.testing.assert_close(first["features"][:5], dncbm.encode_images(model, batch.images[:5]))

    def no_encoding(*args, **kwargs):
        raise RuntimeError("encoded again")

    monkeypatch.setattr(dncbm, "encode_images", no_encoding)
    again = dncbm.world_features(tiny_store, tiny_world, model, key, 300, "corpus", progress=False)
    torch.testing.assert_close(again["features"], first["features"])
    with pytest.raises(RuntimeError, match="encoded again"):  # other parameters: not the cached file
        dncbm.world_features(tiny_store, tiny_world, model, key, 200, "corpus", progress=False)
