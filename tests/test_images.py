"""stepkit.images: image files in any layout, crops drawn on the full image, labelled evaluation sets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from imagefiles import picture, write_folder
from PIL import Image
from torch.utils.data import DataLoader

from stepkit.data import (
    CropPlan,
    EvalImages,
    ResumableSampler,
    TrainImages,
    UnreadableImage,
    center_view,
    crop_box,
    drop_unreadable,
    find_image_data,
    find_images,
    read_crops,
    sample_rng,
)


@given(width=st.integers(8, 2000), height=st.integers(8, 2000), low=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**31))
def test_crop_boxes_lie_in_the_image_with_the_asked_area_and_aspect(width, height, low, seed):
    scale, ratio = (low, 1.0), (3 / 4, 4 / 3)
    left, top, w, h = crop_box(width, height, scale, ratio, np.random.default_rng(seed))
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w >= 1 and h >= 1
    # a box that fit on one of the ten tries has its drawn area and aspect, up to rounding to pixels;
    # the fallback (centred, aspect clamped into ratio) is only taken when none fitted
    area = w * h / (width * height)
    rounding = (w + h + 1) / (width * height)
    fitted = (scale[0] - rounding <= area <= scale[1] + rounding
              and ratio[0] - 2 / h <= w / h <= ratio[1] + 2 / h)
    fallback = (left, top) == ((width - w) // 2, (height - h) // 2)
    assert fitted or fallback


def test_the_fallback_is_the_largest_centred_box_of_an_allowed_aspect():
    rng = np.random.default_rng(0)
    # a whole-area crop of a 4:1 image cannot have an aspect in [3/4, 4/3]: the centred 4/3 box instead
    assert crop_box(400, 100, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (133, 0, 133, 100)
    assert crop_box(100, 400, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (0, 133, 100, 133)
    assert crop_box(120, 100, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (0, 0, 120, 100)  # the whole image fits


def test_the_box_follows_the_image_area_not_a_centre_square():
    # scale 0.25 of a 400 x 100 image at aspect 1: a 100 x 100 box, a quarter of the image's area
    # (a quarter of a 100 x 100 centre square would be 50 x 50)
    left, top, w, h = crop_box(400, 100, (0.25, 0.25), (1.0, 1.0), np.random.default_rng(3))
    assert (w, h) == (100, 100) and top == 0


def stripes(path: Path, width=300, height=100) -> None:
    """Red in the left sixth, blue in the right sixth, grey between."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    pixels[:, : width // 6] = (255, 0, 0)
    pixels[:, -width // 6 :] = (0, 0, 255)
    Image.fromarray(pixels).save(path)


def test_crops_reach_the_whole_image_off_centre_content_included(tmp_path):
    stripes(tmp_path / "wide.png")
    plan = CropPlan(views=((8, (0.02, 0.05)),), flip_p=0.0)
    colours = set()
    for i in range(200):
        crop = read_crops(tmp_path / "wide.png", plan, sample_rng(0, 0, i))[0]
        mean = crop.float().mean(dim=(1, 2))
        if mean[0] > 250 and mean[2] < 5:
            colours.add("red")
        if mean[2] > 250 and mean[0] < 5:
            colours.add("blue")
    assert colours == {"red", "blue"}  # both edges, which a centre square (the middle 100 px) never shows


def test_a_crop_is_the_box_resampled_as_pillow_resamples_it_bicubic_antialiased(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    plan = CropPlan(views=((16, (0.3, 0.6)),), flip_p=1.0)
    got = read_crops(tmp_path / "noise.png", plan, sample_rng(5, 1, 2))[0]
    # the same draws by hand: the box, then the flip, then Pillow's bicubic resize of the box, mirrored
    draws = sample_rng(5, 1, 2)
    left, top, w, h = crop_box(120, 90, (0.3, 0.6), plan.ratio, draws)
    assert draws.random() < 1.0
    image = Image.open(tmp_path / "noise.png").convert("RGB")
    expected = image.resize((16, 16), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    expected = np.asarray(expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).transpose(2, 0, 1)
    difference = (got.float() - torch.from_numpy(expected.copy()).float()).abs()
    # torch's antialiased bicubic on uint8 is Pillow's filter up to fixed-point rounding (clipped between
    # the two passes): on pure noise, the worst case, measured max 11 levels and 0.74 on average
    assert difference.max() <= 12 and difference.mean() < 1.0, (difference.max(), difference.mean())
    assert not torch.equal(got, got.flip(-1))  # and the flip is there (noise is not symmetric)


def test_on_a_photo_like_image_the_crops_are_pillows_to_a_twentieth_of_a_level(tmp_path):
    picture(0, np.random.default_rng(0), (500, 375)).save(tmp_path / "photo.png")
    plan = CropPlan(views=((224, (0.4, 1.0)),) * 2 + ((96, (0.05, 0.4)),) * 8, flip_p=0.0)
    got = read_crops(tmp_path / "photo.png", plan, sample_rng(0, 0, 0))
    draws = sample_rng(0, 0, 0)
    image = Image.open(tmp_path / "photo.png").convert("RGB")
    for crop, (size, scale) in zip(got, plan.views):
        left, top, w, h = crop_box(500, 375, scale, plan.ratio, draws)
        expected = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        expected = torch.from_numpy(np.asarray(expected).transpose(2, 0, 1).copy())
        assert (crop.float() - expected.float()).abs().mean() < 0.1


def test_a_large_jpeg_is_decoded_reduced_and_gives_nearly_the_same_crops(tmp_path):
    x = np.linspace(0, 1, 1024)
    y = np.linspace(0, 1, 768)[:, None]
    pixels = np.stack([x * 255 + 0 * y, y * 255 + 0 * x, (x * y) * 255], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    plan = CropPlan(views=((64, (0.4, 1.0)),) * 2 + ((32, (0.1, 0.4)),) * 4)
    fast = read_crops(tmp_path / "big.jpg", plan, sample_rng(0, 0, 0))
    Image.fromarray(pixels).save(tmp_path / "big.png")  # the same pixels, never reduced on decoding
    full = read_crops(tmp_path / "big.png", plan, sample_rng(0, 0, 0))
    for a, b in zip(fast, full):
        assert (a.float() - b.float()).abs().mean() < 3.0  # of 255: JPEG loss and the reduced decode
    with Image.open(tmp_path / "big.jpg") as image:  # what the draft reduction does for these boxes
        image.draft("RGB", (512, 384))
        assert image.size == (512, 384)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_any_colour_mode_becomes_three_channels(tmp_path, mode):
    image = Image.new("RGB", (50, 40), (200, 30, 30)).convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    image.save(path)
    crops = read_crops(path, CropPlan(views=((12, (0.5, 1.0)),)), sample_rng(0, 0, 0))
    assert crops[0].shape == (3, 12, 12) and crops[0].dtype == torch.uint8
    assert center_view(path, 10).shape == (3, 10, 10)


def test_center_view_resizes_the_shorter_side_then_cuts_the_centre(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 20:60] = 255  # the middle half is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    view = center_view(tmp_path / "wide.png", 16, resize=20)  # 80 x 40 -> 40 x 20, then the centre 16
    assert view.shape == (3, 16, 16)
    assert view[:, :, 4:12].min() == 255  # columns 14..26 of 40 are inside the white band (10..30)


def test_the_crops_of_a_sample_do_not_depend_on_the_workers(tmp_path):
    paths = write_folder(tmp_path / "d", 4, labelled=False)
    plan = CropPlan(views=((24, (0.4, 1.0)),) * 2 + ((12, (0.1, 0.4)),) * 2)
    images = TrainImages(paths, plan, seed=7)

    def epoch_batches(workers):
        sampler = ResumableSampler(len(images), seed=7, with_epoch=True)
        loader = DataLoader(images, batch_size=4, sampler=sampler, num_workers=workers)
        out, it = [], iter(loader)
        for _ in range(6):  # two epochs of 12
            crops, index = next(it)
            out.append((crops, index))
        return out

    alone, pooled = epoch_batches(0), epoch_batches(2)
    for (a, ia), (b, ib) in zip(alone, pooled):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(a, b))
    # the second epoch draws new crops of the same images
    first = {int(i): c[0][k] for c, idx in alone[:3] for k, i in enumerate(idx)}
    second = {int(i): c[0][k] for c, idx in alone[3:] for k, i in enumerate(idx)}
    assert first.keys() == second.keys() and not all(torch.equal(first[i], second[i]) for i in first)


def test_find_images_searches_any_layout_and_skips_hidden_files(tmp_path):
    for name in ("a.jpg", "deep/er/b.PNG", ".cache/c.png", "d/.e.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a.jpg", "deep/er/b.PNG"]
    with pytest.raises(ValueError, match=r"data.root='.*missing' is not allowed: no such folder"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no image files \(.jpg, .jpeg, .png"):
        find_images(tmp_path / "empty")


def test_an_unlabelled_folder_trains_on_every_image_and_skips_evaluation_saying_why(tmp_path):
    # the layout that lost two thirds of its images before: 200 loose, 100 in one sub-folder
    root = tmp_path / "photos"
    (root / "one").mkdir(parents=True)
    for i in range(30):
        Image.new("RGB", (8, 8)).save(root / (f"{i}.png" if i < 20 else f"one/{i}.png"))
    found = find_image_data(root)
    assert len(found.train) == 30 and found.eval_train is None
    assert "evaluation: skipped" in found.notes[-1] and "--eval.train-root" in found.notes[-1]
    assert found.notes[0] == f"data.root {str(root)!r}: 30 images (1 sub-folders)"


def test_the_labelled_layout_with_val_beside_it_keeps_working(tmp_path):
    write_folder(tmp_path / "train", 3)
    write_folder(tmp_path / "val", 2, seed=1)
    found = find_image_data(tmp_path / "train")
    assert len(found.train) == 9 and found.eval_train.classes == ["bar", "cross", "disc"]
    assert len(found.eval_train.paths) == 9 and len(found.eval_val.paths) == 6
    assert found.eval_val.labels == [0, 0, 1, 1, 2, 2]


def test_images_beside_class_folders_are_trained_on_and_named_in_a_warning(tmp_path):
    write_folder(tmp_path / "train", 3)
    write_folder(tmp_path / "val", 2, seed=1)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "stray.png")
    found = find_image_data(tmp_path / "train")  # not a labelled set any more: evaluation is skipped
    assert len(found.train) == 10 and found.eval_train is None and "1 images lie beside" in found.notes[-1]
    found = find_image_data(tmp_path / "train", tmp_path / "train", tmp_path / "val")
    assert any("1 images directly in eval.train_root" in n and "left out" in n for n in found.notes)
    assert len(found.eval_train.paths) == 9


def test_held_out_classes_are_matched_by_name_and_differences_warned(tmp_path):
    write_folder(tmp_path / "fit", 2)
    write_folder(tmp_path / "held", 2, seed=1)
    (tmp_path / "held" / "cross").rename(tmp_path / "held" / "star")  # a class training lacks
    (tmp_path / "held" / "bar").rename(tmp_path / "held" / "aaa_bar")  # sorts first: a name, not a number
    (tmp_path / "fit" / "bar").rename(tmp_path / "fit" / "aaa_bar")
    found = find_image_data(None, tmp_path / "fit", tmp_path / "held")
    assert found.eval_train.classes == ["aaa_bar", "cross", "disc"]
    assert [p.parent.name for p in found.eval_val.paths] == ["aaa_bar", "aaa_bar", "disc", "disc"]
    assert found.eval_val.labels == [0, 0, 2, 2]  # disc is class 2 of the training folders
    warning = next(n for n in found.notes if n.startswith("warning: the evaluation's class folders differ"))
    assert "held-out only ['star']" in warning and "training only ['cross']" in warning


@pytest.mark.parametrize("train, val, message", [
    ("fit", None, "eval.val_root=None is not allowed with --eval.train-root"),
    (None, "held", "eval.train_root=None is not allowed with --eval.val-root"),
])
def test_the_evaluation_folders_come_as_a_pair(tmp_path, train, val, message):
    write_folder(tmp_path / "fit", 1)
    write_folder(tmp_path / "held", 1)
    with pytest.raises(ValueError, match=message):
        find_image_data(None, train and tmp_path / train, val and tmp_path / val)


def test_unreadable_files_are_named_or_skipped_and_counted(tmp_path):
    paths = write_folder(tmp_path / "d", 2, labelled=False)
    jpeg = next(p for p in paths if p.suffix == ".jpg")
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])  # cut off: opens, cannot decode
    (tmp_path / "d" / "fake.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableImage, match=rf"{jpeg.name}: not a readable image .*--data.skip-unreadable"):
        find_image_data(tmp_path / "d")
    found = find_image_data(tmp_path / "d", skip_unreadable=True)
    assert sorted(p.name for p in found.skipped) == sorted([jpeg.name, "fake.png"])
    assert len(found.train) == 5 and "2 unreadable files skipped" in found.notes[0]
    # past check_up_to, a file is found when a worker decodes it: the error still names it
    kept, skipped = drop_unreadable(found.train + [jpeg], skip=False, flag="data.root", check_up_to=1)
    assert len(kept) == 6 and skipped == []  # too many to decode up front: none checked
    images = TrainImages([jpeg], CropPlan(views=((8, (0.5, 1.0)),)), seed=0)
    with pytest.raises(UnreadableImage, match=rf"{jpeg.name}: not a readable image"):
        images[(0, 0)]
    with pytest.raises(UnreadableImage, match=rf"{jpeg.name}: not a readable image"):
        EvalImages([jpeg], [0], size=8)[0]


def test_plan_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"crop scale=\(0.0, 1.0\) is not allowed"):
        CropPlan(views=((8, (0.0, 1.0)),))
    with pytest.raises(ValueError, match="at least one view"):
        CropPlan(views=())


def test_a_jpeg_in_memory_reads_like_the_file(tmp_path):
    write_folder(tmp_path / "d", 1, labelled=False)
    path = sorted((tmp_path / "d").glob("*.jpg"))[0]
    plan = CropPlan(views=((20, (0.3, 1.0)),) * 3)
    from_file = read_crops(path, plan, sample_rng(1, 2, 3))
    from_bytes = read_crops(path.read_bytes(), plan, sample_rng(1, 2, 3))
    assert all(torch.equal(a, b) for a, b in zip(from_file, from_bytes))  # a shard member's bytes


def test_an_image_past_pillows_pixel_limit_is_named_not_a_traceback(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    PILImage.new("RGB", (60, 60)).save(tmp_path / "huge.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 3600 pixels > 2 x 100: a "decompression bomb"
    with pytest.raises(UnreadableImage, match=r"huge.png: not a readable image \(DecompressionBombError"):
        TrainImages([tmp_path / "huge.png"], CropPlan(views=((8, (0.5, 1.0)),)), seed=0)[(0, 0)]
    with pytest.raises(UnreadableImage, match=r"huge.png: not a readable image \(DecompressionBombError"):
        find_image_data(tmp_path)
