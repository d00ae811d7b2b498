"""The gray-box oracle: the fold's MIL head ranks tiles (attention) or scores the bag (slide
cross-entropy); its outputs are marked; the workflow makes only these attacks wait for the heads."""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import ROOT, snakemake_command
from wsiattack import stores
from wsiattack.attacks.oracle import MILHead, load_fold_head, stable_cross_entropy
from wsiattack.attacks.params import normalise_attack, threat_marking
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.attacks.selection import attention_scores, top_k_selection
from wsiattack.encoders.model import build_encoder
from wsiattack.errors import AttackError, StoreError
from wsiattack.evaluation import evaluate_attack
from wsiattack.extraction import extract_slide, reembed_slide
from wsiattack.mil import MIL_MODELS, GatedABMIL, build_mil_model, save_mil_checkpoint
from wsiattack.shards import partition, shard_of

CPU = torch.device("cpu")
CLASSES = ["normal", "tumor"]
N_TILES, K = 12, 3
DIM = 192  # the demo encoder's embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def head(seed: int, *, reverse: bool = False) -> GatedABMIL:
    """A seeded untrained head; ``reverse`` flips the sign of its attention logits (and ranking)."""
    torch.manual_seed(seed)
    module = GatedABMIL(in_dim=DIM, n_classes=2, hidden_dim=16, attention_dim=8, dropout=0.0).eval()
    if reverse:
        with torch.no_grad():
            module.attention.attention_w.weight.neg_()
            module.attention.attention_w.bias.neg_()
    return module


def fold_head(fold: int) -> GatedABMIL:
    """Fold 1 ranks tiles in the opposite order to fold 0: picking the wrong fold shows."""
    return head(seed=1, reverse=fold == 0)


@pytest.fixture
def slide(tmp_path):
    """Tiles store, clean features store (demo encoder) and the encoder of one 12-tile slide 's1'."""
    rng = np.random.default_rng(0)
    tiles = np.clip(
        rng.permutation(np.linspace(40, 200, N_TILES))[:, None, None, None] + rng.normal(0, 12, (N_TILES, 32, 32, 3)),
        0,
        255,
    ).astype(np.uint8)
    with stores.atomic_store(tmp_path / "tiles.zarr", kind=stores.TILES, attrs={"slide_id": "s1"}) as group:
        stores.create_tiles_array(group, n_tiles=N_TILES, tile_px=32)[...] = tiles
    encoder = build_encoder("demo")
    extract_slide(
        slide_id="s1",
        tiles_store=tmp_path / "tiles.zarr",
        encoder=encoder,
        batch_size=16,
        device=CPU,
        out_store=tmp_path / "features.zarr",
    )
    features = np.asarray(stores.open_store(tmp_path / "features.zarr", kind=stores.FEATURES)["features"][...])
    return tmp_path / "tiles.zarr", tmp_path / "features.zarr", encoder, features


@pytest.fixture
def fold_heads(tmp_path):
    """Two folds' checkpoints; 's1' is a test slide of fold 1 (label tumor), 's2' of fold 0."""
    pd.DataFrame(
        {"slide_id": ["s1", "s2"], "label": ["tumor", "normal"], "patient_id": ["s1", "s2"], "fold": [1, 0]}
    ).to_csv(tmp_path / "splits.csv", index=False)
    paths = []
    for fold, train in ((0, ["s1"]), (1, ["s2"])):
        path = tmp_path / "mil" / f"fold{fold}" / "model.safetensors"
        save_mil_checkpoint(path, model=fold_head(fold), meta={"fold": fold, "classes": CLASSES, "train_slides": train})
        paths.append(path)
    return tmp_path / "splits.csv", paths


def spec(**changes):
    entry = {
        "name": "x",
        "method": "pgd",
        "objective": "cosine",
        "eps": 8 / 255,
        "budget": {"fraction": K / N_TILES, "min_tiles": 1},
        "selection": "random",
        "seed": 0,
        **changes,
    }
    if entry["selection"] == "attention" or entry["objective"] == "mil_cross_entropy":
        entry["mil"] = "abmil"
    return normalise_attack(entry, where="attacks.x")


def perturb(tmp_path, slide, entry, name, **kwargs):
    tiles, features, encoder, _ = slide
    perturb_slide(
        slide_id="s1",
        tiles_store=tiles,
        encoder=encoder,
        spec=entry,
        out_store=tmp_path / name,
        device=CPU,
        features_store=features,
        **kwargs,
    )
    return stores.open_store(tmp_path / name, kind=stores.ATTACK)


def slide_cross_entropy(module, bag, *, target):
    with torch.no_grad():
        logits, _ = module(torch.as_tensor(bag, dtype=torch.float32))
    return float(F.cross_entropy(logits[None], torch.tensor([target])))


def test_the_head_is_the_one_of_the_slides_test_fold(fold_heads, tmp_path):
    splits, paths = fold_heads
    loaded = load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths)
    assert loaded.provenance == {"model": "abmil", "fold": 1} and loaded.target == CLASSES.index("tumor")
    torch.testing.assert_close(loaded.module.state_dict(), fold_head(1).state_dict())
    assert not any(p.requires_grad for p in loaded.module.parameters())
    with pytest.raises(AttackError, match="test slide of fold 1, but 0 of the 1 MIL checkpoints"):
        load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths[:1])
    with pytest.raises(AttackError, match="s3: not in"):
        load_fold_head(slide_id="s3", splits_csv=splits, model_paths=paths)
    save_mil_checkpoint(paths[1], model=fold_head(1), meta={"fold": 1, "classes": CLASSES, "train_slides": ["s1"]})
    with pytest.raises(StoreError, match="re-run train_mil"):  # a head that saw the slide is refused
        load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths)
    save_mil_checkpoint(
        paths[1], model=fold_head(1), meta={"fold": 1, "classes": CLASSES, "train_slides": [], "val_slides": ["s1"]}
    )
    with pytest.raises(StoreError, match="re-run train_mil"):  # so is one that early-stopped on it
        load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths)


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_every_head_ranks_tiles_and_gives_the_oracle_a_gradient(name):
    torch.manual_seed(0)
    module = build_mil_model(name, in_dim=DIM, n_classes=2, hidden_dim=16).eval().requires_grad_(False)
    bag = torch.randn(N_TILES, DIM)
    scores = attention_scores(head=module, bag=bag.numpy())
    assert scores.shape == (N_TILES,) and scores.sum() == pytest.approx(1.0) and np.ptp(scores) > 0
    # the top-ranked tiles: a max-pooling head passes no gradient to tiles below the arg-max
    rows = torch.from_numpy(np.argsort(-scores)[:3].copy())
    embedding = (bag[rows] + 0.1 * torch.randn(3, DIM)).requires_grad_(True)
    objective = MILHead(module=module, target=1).objective_for(bag=bag, rows=rows)
    value = objective(embedding, bag[rows])
    value.sum().backward()
    assert value.shape == (3,) and torch.isfinite(value).all()
    assert embedding.grad.abs().sum() > 0


def test_attention_selection_picks_the_folds_top_attention_tiles_and_is_marked(tmp_path, slide, fold_heads):
    splits, paths = fold_heads
    _, _, _, features = slide
    mil_head = load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths)
    store = perturb(tmp_path, slide, spec(selection="attention"), "att.zarr", mil_head=mil_head)
    expected = top_k_selection(attention_scores(head=fold_head(1), bag=features), k=K, what="t").index
    other_fold = top_k_selection(attention_scores(head=fold_head(0), bag=features), k=K, what="t").index
    assert not np.array_equal(expected, other_fold)  # the choice of fold matters on this slide
    np.testing.assert_array_equal(store["index"][...], expected)
    np.testing.assert_allclose(
        store["selection_score"][...], attention_scores(head=fold_head(1), bag=features)[expected], rtol=1e-6
    )
    assert store.attrs["label_free"] is False and store.attrs["threat_model"] == "gray-box"
    assert store.attrs["mil_head"] == {"model": "abmil", "fold": 1}
    with pytest.raises(AttackError, match="needs the trained MIL head of the slide's test fold"):
        perturb(tmp_path, slide, spec(selection="attention"), "b.zarr")


def test_oracle_objective_raises_the_slide_cross_entropy_beyond_noise(tmp_path, slide):
    _, _, encoder, features = slide
    target = 0
    mil_head = MILHead(
        module=head(seed=3).requires_grad_(False), target=target, provenance={"model": "abmil", "fold": 0}
    )
    attack = perturb(tmp_path, slide, spec(objective="mil_cross_entropy", steps=10), "ce.zarr", mil_head=mil_head)
    noise = perturb(
        tmp_path, slide, spec(objective="mil_cross_entropy", method="noise"), "noise.zarr", mil_head=mil_head
    )
    np.testing.assert_array_equal(attack["index"][...], noise["index"][...])  # same seed, same tiles
    clean = slide_cross_entropy(mil_head.module, features, target=target)
    reembed_slide(
        slide_id="s1",
        attack_store=tmp_path / "ce.zarr",
        encoder=encoder,
        batch_size=16,
        device=CPU,
        out_store=tmp_path / "re.zarr",
    )
    replaced = stores.open_store(tmp_path / "re.zarr", kind=stores.REEMBEDDED)
    bag = features.copy()
    bag[np.asarray(replaced["index"][...])] = np.asarray(replaced["features"][...])
    attacked = slide_cross_entropy(mil_head.module, bag, target=target)
    np.testing.assert_allclose(attack["objective"][...], attacked, rtol=1e-4)  # one joint value: the bag's loss
    assert attacked - clean > 10 * abs(float(noise["objective"][0]) - clean) > 0  # the noise control barely moves it
    assert attack.attrs["label_free"] is False and attack.attrs["threat_model"] == "gray-box"
    assert attack.attrs["mil_head"] == {"model": "abmil", "fold": 0}


def test_threat_marking_is_decided_by_the_entry_and_the_evaluating_encoder():
    white = {"label_free": True, "threat_model": "white-box", "surrogate": ""}
    gray = {"label_free": False, "threat_model": "gray-box", "surrogate": ""}
    assert threat_marking({"selection": "random", "objective": "cosine"}) == white
    assert threat_marking({"selection": "attention", "objective": "l2"}) == gray
    assert threat_marking({"selection": "centrality", "objective": "mil_cross_entropy"}) == gray
    transfer = {"selection": "random", "objective": "cosine", "surrogate": "demo"}
    assert threat_marking(transfer, encoder="demo_trained") == {
        "label_free": True,
        "threat_model": "black-box (transfer)",
        "surrogate": "demo",
    }
    assert threat_marking(transfer, encoder="demo")["threat_model"] == "white-box"  # the diagonal
    assert threat_marking(transfer)["threat_model"] == "white-box"  # the surrogate's own attack store


def test_evaluation_rows_carry_the_marking(tmp_path, slide, fold_heads):
    splits, paths = fold_heads
    tiles, features_store, encoder, _ = slide
    pd.read_csv(splits).query("slide_id == 's1'").to_csv(tmp_path / "s1_split.csv", index=False)
    mil_head = load_fold_head(slide_id="s1", splits_csv=splits, model_paths=paths)
    for name, entry in (("att", spec(selection="attention")), ("rnd", spec())):
        perturb(tmp_path, slide, entry, f"{name}.zarr", mil_head=mil_head)
        reembed_slide(
            slide_id="s1",
            attack_store=tmp_path / f"{name}.zarr",
            encoder=encoder,
            batch_size=16,
            device=CPU,
            out_store=tmp_path / name / "s1.zarr",
        )
        table = evaluate_attack(
            splits_csv=tmp_path / "s1_split.csv",
            model_paths=paths[1:],
            feature_stores=[_named(features_store, tmp_path)],
            reembedded_stores=[tmp_path / name / "s1.zarr"],
            classes=CLASSES,
        )
        expected = (False, "gray-box") if name == "att" else (True, "white-box")
        assert tuple(table.loc[0, ["label_free", "threat_model"]]) == expected
        reembedded = stores.open_store(tmp_path / name / "s1.zarr", kind=stores.REEMBEDDED).attrs
        assert (reembedded["label_free"], reembedded["threat_model"]) == expected


def _named(features_store, tmp_path):
    """Evaluation finds a slide's features by the store's name."""
    target = tmp_path / "features" / "s1.zarr"
    if not target.exists():
        target.parent.mkdir()
        target.symlink_to(features_store)
    return target


# --- the workflow: only gray-box attacks wait for the trained heads ---------------------------------


def dry_run_jobs(workdir: Path, target: str) -> dict[str, int]:
    command = snakemake_command(workdir, "-n", target, cores=1, gpu_tokens=None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    table = out[out.index("Job stats:") :].split("\n\n")[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in table) if rule != "total"}


def test_dry_run_attention_attack_waits_for_the_heads_random_does_not(tmp_path):
    rows = [{"slide_id": f"s{i}", "path": f"s{i}.svs", "label": CLASSES[i % 2]} for i in range(4)]
    for row in rows:
        (tmp_path / row["path"]).write_bytes(b"not read by a dry run")
    pd.DataFrame(rows).to_csv(tmp_path / "samples.csv", index=False)
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.pop("demo")
    config["samples"] = "samples.csv"
    config["attacks"] = {
        "att": {"method": "pgd", "eps": "4/255", "steps": 1, "selection": "attention"},
        "oracle": {"method": "pgd", "eps": "4/255", "steps": 1, "objective": "mil_cross_entropy"},
        "rnd": {"method": "pgd", "eps": "4/255", "steps": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    members = partition([row["slide_id"] for row in rows], n_shards=config.get("shards", 4))
    shard = shard_of("s0", n_shards=config.get("shards", 4))
    for attack in ("att", "oracle"):  # every slide's features (training), then the heads
        jobs = dry_run_jobs(tmp_path, f"results/attacks/{attack}/demo/{shard}")
        assert jobs == {"tile": len(members), "extract": len(members), "split": 1, "train_mil": 2, "attack": 1}, jobs
    assert dry_run_jobs(tmp_path, f"results/attacks/rnd/demo/{shard}") == {"tile": 1, "attack": 1}  # its own shard only


def test_oracle_batches_see_the_earlier_batches_adversarial_rows(tmp_path, slide, monkeypatch):
    """With k > ATTACK_BATCH the attack is joint, batch by batch: each batch's bag holds the
    stored adversarial embeddings of the batches before it, and the clean features of the rest."""
    from wsiattack.attacks import perturb as perturb_module

    _, _, encoder, features = slide
    monkeypatch.setattr(perturb_module, "ATTACK_BATCH", 1)
    seen = []
    original = MILHead.objective_for

    def spy(self, *, bag, rows):
        seen.append((bag.clone(), rows.clone()))
        return original(self, bag=bag, rows=rows)

    monkeypatch.setattr(MILHead, "objective_for", spy)
    mil_head = MILHead(module=head(seed=3).requires_grad_(False), target=0, provenance={"model": "abmil", "fold": 0})
    store = perturb(tmp_path, slide, spec(objective="mil_cross_entropy", steps=3), "ce.zarr", mil_head=mil_head)
    index = store["index"][...]
    with torch.no_grad():
        adversarial = encoder(torch.as_tensor(store["adv_tiles"][...]).permute(0, 3, 1, 2).float() / 255).float()
    assert len(seen) == K
    for batch, (bag, rows) in enumerate(seen):
        assert rows.tolist() == [index[batch]]
        torch.testing.assert_close(bag[index[:batch]], adversarial[:batch])  # earlier batches: attacked
        torch.testing.assert_close(bag[index[batch:]], torch.as_tensor(features[index[batch:]]))  # the rest: clean


@pytest.mark.parametrize("n_classes", [2, 3])
def test_oracle_loss_is_cross_entropy_with_a_gradient_that_survives_a_confident_head(n_classes):
    torch.manual_seed(0)
    logits = torch.randn(n_classes, dtype=torch.float64) * 3
    for target in range(n_classes):
        expected = F.cross_entropy(logits[None], torch.tensor([target]))
        assert stable_cross_entropy(logits, target=target).item() == pytest.approx(expected.item(), rel=1e-6)
    # a head sure of the true class: logit gap 120, past float32 softmax's underflow (~88-103)
    confident = torch.full((n_classes,), -60.0)
    confident[0] = 60.0
    naive = confident.clone().requires_grad_(True)
    F.cross_entropy(naive[None], torch.tensor([0])).backward()
    assert naive.grad.abs().max() == 0  # what the oracle used to hand the attack: no gradient at all
    stable = confident.clone().requires_grad_(True)
    value = stable_cross_entropy(stable, target=0)
    value.backward()
    assert value.dtype == torch.float32 and 0 <= value.item() < 1e-40
    assert stable.grad[0] == pytest.approx(-1.0) and stable.grad[1:].sum() == pytest.approx(1.0)
