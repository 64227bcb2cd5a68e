"""Sampling from the tiny checkpoint trained in this session: variations, SDEdit edits, interpolations, eval."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from generate import images as generate
from generate import sample as S
from webpairs.cli import main

TENCH, OSTRICH, HEN = "n01440764_tench.JPEG", "n01518878_ostrich.JPEG", "n01514859_hen.JPEG"


@pytest.fixture(scope="module")
def model(tiny_run):
    from core.encoders import load_encoder

    loaded = generate.load_model(tiny_run["run"])
    return loaded, load_encoder(loaded.encoder_name)


@pytest.fixture(scope="module")
def eval_photos(tmp_path_factory, photos_dir):
    """Every 10th shared photo (30 of 300, sorted): `eval --topics 3` makes 3 topics of 10 (1
    condition, 9 real images each). What the eval tests check (rows, per-sample scores, their
    pairing) does not depend on how many real images there are; each evaluation embeds 27 of
    them instead of 297."""
    folder = tmp_path_factory.mktemp("eval_photos")
    for name in sorted(os.listdir(photos_dir))[::10]:
        os.symlink(os.path.join(photos_dir, name), folder / name)
    return str(folder)


def _pixels(folder: str, prefix: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(os.path.join(folder, n))) for n in sorted(os.listdir(folder)) if n.startswith(prefix)]


def test_checkpoint_records_what_sampling_needs(model, tiny_run):
    loaded, encoder = model
    assert loaded.step == 40 and loaded.preset == "tiny" and loaded.encoder_name == "efficientnet-lite0"
    assert loaded.path == generate.find_checkpoint(tiny_run["result"]["checkpoint"])  # the run dir resolves to its latest checkpoint


def test_variations_count_size_and_seed(model, photos_dir, tmp_path):
    loaded, encoder = model
    image = generate.read_image(os.path.join(photos_dir, TENCH))
    a = generate.variations(loaded, encoder, image, str(tmp_path / "a"), n=3, steps=10, seed=7)
    generate.variations(loaded, encoder, image, str(tmp_path / "b"), n=3, steps=10, seed=7)
    generate.variations(loaded, encoder, image, str(tmp_path / "c"), n=3, steps=10, seed=8)
    assert len(a) == 3 and all(Image.open(p).size == (32, 32) for p in a)
    pa, pb, pc = (_pixels(str(tmp_path / d), "variation") for d in "abc")
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))  # same seed, same pixels
    assert not np.array_equal(pa[0], pc[0])
    assert not np.array_equal(pa[0], pa[1])  # n different samples, not one repeated
    sheet = Image.open(tmp_path / "a" / "sheet.png")
    assert sheet.size == (4 * generate.SHEET_CELL, generate.SHEET_CELL)  # the input, then 3 variations
    assert json.load(open(tmp_path / "a" / "meta.json"))["seed"] == 7


def test_edit_strength_zero_returns_the_guide(model, photos_dir, tmp_path):
    loaded, encoder = model
    guide = generate.read_image(os.path.join(photos_dir, HEN))
    paths = generate.edit(loaded, encoder, guide, str(tmp_path), strength=0.0, n=2, steps=10)
    expected = np.asarray(S.to_pil(generate.to_model([guide], 32, "cpu"))[0])
    assert len(paths) == 2 and all(np.array_equal(np.asarray(Image.open(p)), expected) for p in paths)


def test_edit_with_mask_keeps_the_unmasked_region(model, photos_dir, tmp_path):
    loaded, encoder = model
    guide = generate.read_image(os.path.join(photos_dir, HEN))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half may change
    generate.edit(loaded, encoder, guide, str(tmp_path), strength=0.6, mask=mask, cond_image=generate.read_image(os.path.join(photos_dir, OSTRICH)), n=2, steps=20)
    original = np.asarray(S.to_pil(generate.to_model([guide], 32, "cpu"))[0]).astype(int)
    for out in _pixels(str(tmp_path), "edit"):
        diff = np.abs(out.astype(int) - original)
        assert diff[:, 16:].max() <= 2  # unmasked right half: the guide, within the last step's noise
        assert diff[:, :16].mean() > 5  # masked left half was regenerated


def test_edit_without_mask_changes_more_with_strength(model, photos_dir, tmp_path):
    loaded, encoder = model
    guide = generate.read_image(os.path.join(photos_dir, HEN))
    original = np.asarray(S.to_pil(generate.to_model([guide], 32, "cpu"))[0]).astype(int)
    change = {}
    for t in (0.2, 0.8):
        generate.edit(loaded, encoder, guide, str(tmp_path / str(t)), strength=t, n=2, steps=20)
        change[t] = np.mean([np.abs(o.astype(int) - original).mean() for o in _pixels(str(tmp_path / str(t)), "edit")])
    assert change[0.2] < change[0.8]


def test_interpolate_endpoints_and_monotone_path(model, photos_dir, tmp_path):
    loaded, encoder = model
    a, b = (generate.read_image(os.path.join(photos_dir, n)) for n in (TENCH, OSTRICH))
    paths = generate.interpolate(loaded, encoder, a, b, str(tmp_path), frames=7, noise=(0.4, 0.4), candidates=1, steps=20, seed=3)
    assert len(paths) == 7 and all(Image.open(p).size == (32, 32) for p in paths)
    frames = np.stack(_pixels(str(tmp_path), "frame")).astype(int)
    # the end frames are A and B noised (shared noise of seed 3) to 0.4 and denoised on their own embedding
    xa, xb = generate.to_model([a, b], 32, "cpu")
    ca, cb = torch.from_numpy(generate.embed(encoder, [a, b]))
    eps = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    for frame, x, c in ((frames[0], xa, ca), (frames[-1], xb, cb)):
        alone = S.denoise_from(loaded.model, x[None], c[None], 0.4, eps, steps=20)
        assert np.abs(frame - np.asarray(S.to_pil(alone)[0]).astype(int)).max() <= 2
    # in embedding space every frame is closer to the B end (relative to the A end) than the frame before;
    # the ends are the generated A and B just checked (a 40-step model leaves noise the inputs lack)
    e = generate.embed(encoder, [Image.fromarray(f.astype(np.uint8)) for f in frames])
    progress = e @ e[-1] - e @ e[0]
    assert (np.diff(progress) > 0).mean() >= 0.8, progress


def test_interpolate_ranks_candidates(model, photos_dir, tmp_path):
    loaded, encoder = model
    a, b = (generate.read_image(os.path.join(photos_dir, n)) for n in (TENCH, HEN))
    generate.interpolate(loaded, encoder, a, b, str(tmp_path), frames=3, candidates=3, steps=10)
    meta = json.load(open(tmp_path / "meta.json"))
    scores = np.asarray(meta["scores"])  # (candidates, frames)
    assert scores.shape == (3, 3) and meta["chosen"] == scores.argmax(0).tolist()
    assert meta["levels"] == pytest.approx([0.30, 0.425, 0.55])
    with pytest.raises(ValueError, match="text tower"):  # efficientnet has no text tower to rank by prompt
        generate.interpolate(loaded, encoder, a, b, str(tmp_path / "x"), frames=3, candidates=1, steps=5, rank_prompt="a bird")


def test_sample_and_eval_commands(tiny_run, photos_dir, eval_photos, tmp_path, capsys):
    run = tiny_run["run"]
    assert main(["sample", "variations", run, "--image", os.path.join(photos_dir, TENCH), "--n", "2", "--steps", "5", "--out", str(tmp_path / "v")]) == 0
    assert len(_pixels(str(tmp_path / "v"), "variation")) == 2
    assert main(["sample", "interpolate", run, "--a", os.path.join(photos_dir, TENCH), "--b", os.path.join(photos_dir, HEN), "--frames", "3", "--candidates", "2", "--steps", "5", "--noise", "0.3..0.5", "--out", str(tmp_path / "i")]) == 0
    assert len(_pixels(str(tmp_path / "i"), "frame")) == 3
    out = str(tmp_path / "eval.json")
    assert main(["eval", run, "--images", eval_photos, "--topics", "3", "--samples-per-class", "3", "--steps", "5", "--out", out]) == 0
    result = json.load(open(out))
    assert [r["guidance"] for r in result["rows"]] == [3.0, 0.0, "real"]
    assert len(result["classes"]) == 3 and result["real_images"] == 3 * 9
    for row in result["rows"][:2]:
        assert row["fid"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and -1 <= row["consistency"] <= 1
    assert os.path.exists(str(tmp_path / "eval_sheet.png"))
    assert "consistency" in capsys.readouterr().out
    # clear errors
    assert main(["sample", "variations", str(tmp_path), "--image", os.path.join(photos_dir, TENCH), "--out", str(tmp_path / "x")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["sample", "variations", run, "--image", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "edit", run, "--guide", os.path.join(photos_dir, HEN), "--strength", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "strength" in capsys.readouterr().err


def test_eval_compare_pairs_two_models(tiny_run, eval_photos, tmp_path, capsys):
    """`eval --compare A B`: the step-20 and step-40 checkpoints of one run get the same conditions
    and noise; the paired statistics are those of the per-sample scores both runs stored."""
    from train.train import checkpoint_folders

    older = checkpoint_folders(tiny_run["run"])[-1]
    out = str(tmp_path / "cmp.json")
    args = ["--images", eval_photos, "--topics", "3", "--samples-per-class", "4", "--steps", "4", "--guidance", "3", "--out", out]
    assert main(["eval", "--compare", older, tiny_run["run"], *args]) == 0
    printed = capsys.readouterr().out
    result = json.load(open(out))
    a, b = result["a"], result["b"]
    assert (a["step"], b["step"]) == (20, 40)
    assert a["classes"] == b["classes"] and len(a["per_sample"]["3.0"]["class_match"]) == 12
    pa, pb, paired = a["per_sample"]["3.0"], b["per_sample"]["3.0"], result["paired"]["3.0"]
    assert paired["consistency_centered"]["mean_diff"] == pytest.approx(np.mean(pa["consistency_centered"]) - np.mean(pb["consistency_centered"]))
    assert a["rows"][0]["consistency_centered"] == pytest.approx(np.mean(pa["consistency_centered"]))
    cm = paired["class_match"]
    assert cm["only_a"] - cm["only_b"] == sum(pa["class_match"]) - sum(pb["class_match"])
    assert a["rows"][0]["class_match"] == pytest.approx(np.mean(pa["class_match"]))
    assert "A minus B" in printed and "McNemar" in printed and printed.count("\nA ") >= 1
    sheets = [Image.open(tmp_path / f"cmp_sheet_{x}.png") for x in "ab"]
    assert Image.open(tmp_path / "cmp_sheets.png").width == sheets[0].width + sheets[1].width + 16
    # the same model twice: identical samples (same conditions and noise), nothing discordant
    assert main(["eval", "--compare", older, older, *args]) == 0
    same = json.load(open(out))
    assert same["a"]["per_sample"] == same["b"]["per_sample"] and same["paired"]["3.0"]["class_match"]["only_a"] == 0
    capsys.readouterr()
    assert main(["eval", tiny_run["run"], "--compare", older, older, *args]) == 2
    assert "not both" in capsys.readouterr().err


def test_compare_refuses_evaluations_that_are_not_paired():
    from generate.evaluate import compare

    base = {"shots": 1, "samples_per_class": 4, "steps": 4, "sampler": "ddim", "seed": 0, "k": 3, "classes": ["t0"], "metric_encoder": "m", "real_images": 9, "per_sample": {}}
    with pytest.raises(ValueError, match="seed"):
        compare(base, dict(base, seed=1))
