import numpy as np
import pytest
import torch

from stepkit.data import load_fmri_npz, synthetic_fmri, time_blocks


def test_synthetic_fmri_is_seeded_and_shaped():
    a, b = (synthetic_fmri(seed=3, time_points=400, voxels=7) for _ in range(2))
    assert {k: v.shape for k, v in a.items()} == {
        "video": (400, 64), "audio": (400, 32), "text": (400, 48), "fmri": (400, 7), "fmri_clean": (400, 7)
    }
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fmri"], synthetic_fmri(seed=4, time_points=400, voxels=7)["fmri"])
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in a.values())


def test_synthetic_fmri_noise_ceiling_is_below_one():
    d = synthetic_fmri(time_points=2000, voxels=20)
    r = [np.corrcoef(d["fmri"][:, v], d["fmri_clean"][:, v])[0, 1] for v in range(20)]
    assert 0.8 < np.mean(r) < 0.95  # fmri_noise 0.5 on unit-variance responses: r = 1/sqrt(1.25)


def test_time_blocks_are_ordered_and_never_share_a_time_point():
    train, val, test = time_blocks(1000, (0.7, 0.15, 0.15), window=6)
    assert train[0] == 5 and train[-1] == 699
    assert val[0] == 705 and val[-1] == 849 and test[0] == 855 and test[-1] == 999
    seen = [set(range(t - 5, t + 1)) for block in (train, val, test) for t in block[[0, -1]]]
    reach = [set().union(*(set(range(t - 5, t + 1)) for t in block)) for block in (train, val, test)]
    assert not (reach[0] & reach[1]) and not (reach[1] & reach[2]) and seen


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.9, 0.1, 0.0)])
def test_time_blocks_reject_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions=.*three positive numbers that sum to 1"):
        time_blocks(100, fractions)


def save(tmp_path, **arrays):
    path = tmp_path / "subject.npz"
    np.savez(path, **arrays)
    return path


def good(t=60):
    rng = np.random.default_rng(0)
    return {"video": rng.random((t, 4)), "audio": rng.random((t, 3)), "text": rng.random((t, 2)),
            "fmri": rng.random((t, 5))}


def test_load_fmri_npz_reads_a_good_file(tmp_path):
    data = load_fmri_npz(save(tmp_path, **good()))
    assert data["fmri"].shape == (60, 5) and data["video"].dtype == np.float32


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"data.path='.*nope.npz' is not allowed: no such file"):
        load_fmri_npz(tmp_path / "nope.npz")


def test_missing_array(tmp_path):
    arrays = good()
    del arrays["audio"]
    with pytest.raises(ValueError, match=r"subject.npz: missing arrays \['audio'\]"):
        load_fmri_npz(save(tmp_path, **arrays))


def test_mismatched_lengths(tmp_path):
    arrays = good()
    arrays["fmri"] = arrays["fmri"][:50]
    with pytest.raises(ValueError, match=r"differ in length .*'fmri': 50"):
        load_fmri_npz(save(tmp_path, **arrays))


def test_nans_are_located(tmp_path):
    arrays = good()
    arrays["text"][7, 1] = np.nan
    expected = r"array 'text' has 1 NaN or infinite values \(first at time 7, column 1\)"
    with pytest.raises(ValueError, match=expected):
        load_fmri_npz(save(tmp_path, **arrays))


def test_wrong_rank_and_too_short(tmp_path):
    arrays = good()
    arrays["fmri"] = arrays["fmri"][:, 0]
    with pytest.raises(ValueError, match=r"array 'fmri' has shape \(60,\); expected 2-D"):
        load_fmri_npz(save(tmp_path, **arrays))
    with pytest.raises(ValueError, match="10 time points; expected at least 50"):
        load_fmri_npz(save(tmp_path, **good(10)))


def test_not_an_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_fmri_npz(path)


def test_digits_canvas_is_seeded_split_and_in_range():
    from stepkit.data import digits_canvas

    a, b = digits_canvas(seed=1, size=24), digits_canvas(seed=1, size=24)
    assert a["train_images"].shape == (1438, 1, 24, 24) and a["test_images"].shape == (359, 1, 24, 24)
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert 0 <= a["train_images"].min() and a["train_images"].max() <= 1
    assert not torch_equal(a["train_images"], digits_canvas(seed=2, size=24)["train_images"])
    assert sorted(a["train_labels"].unique().tolist()) == list(range(10))


def test_digits_canvas_is_hard_for_raw_pixels():
    from stepkit.data import digits_canvas
    from stepkit.evaluation import knn_accuracy

    d = digits_canvas()
    train, test = d["train_images"].flatten(1), d["test_images"].flatten(1)
    acc = knn_accuracy(train, d["train_labels"], test, d["test_labels"])
    assert 0.3 < acc < 0.75  # plain 8x8 digits give 0.98: learning has room to show


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_resumable_sampler_resumes_and_shards():
    from itertools import islice

    from stepkit.data import ResumableSampler

    full = list(islice(iter(ResumableSampler(10, seed=3)), 25))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20]  # a new order each epoch
    assert list(islice(iter(ResumableSampler(10, seed=3, start=13)), 12)) == full[13:25]
    ranks = [list(islice(iter(ResumableSampler(10, seed=3, rank=r, world=2)), 5)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    with pytest.raises(ValueError, match="rank=2"):
        ResumableSampler(10, rank=2, world=2)
    with_epoch = list(islice(iter(ResumableSampler(10, seed=3, start=8, with_epoch=True)), 4))
    assert with_epoch == [(full[8], 0), (full[9], 0), (full[10], 1), (full[11], 1)]


def test_captioned_digits_say_what_where_and_how_big():
    from stepkit.data import DIGIT_WORDS, PLACE_WORDS, SIZE_WORDS, digits_captioned

    d = digits_captioned(seed=3)
    assert d["train_images"].shape[1:] == (1, 32, 32)
    assert len(d["train_images"]) + len(d["test_images"]) == 1797
    for split in ("train", "test"):
        rows = zip(d[f"{split}_captions"], d[f"{split}_labels"], d[f"{split}_caption_ids"])
        for caption, label, cid in rows:
            size, digit = caption.split()[1:3]
            place = " ".join(caption.split()[3:])
            assert digit == DIGIT_WORDS[label] and size in SIZE_WORDS and place in PLACE_WORDS
            s, p = list(SIZE_WORDS).index(size), list(PLACE_WORDS).index(place)
            assert cid == (label * 3 + s) * 9 + p  # equal ids <=> equal captions
    # a digit "in the upper left" has its ink there: the mean row/column of the ink is up and left
    img = d["train_images"][[i for i, c in enumerate(d["train_captions"]) if c.endswith("upper left")]]
    ink = img.clamp_min(0.3) - 0.3
    rows = (ink.sum(dim=(1, 3)) * torch.arange(32)).sum(1) / ink.sum(dim=(1, 2, 3))
    assert (rows < 16).float().mean() > 0.95
    again = digits_captioned(seed=3)
    assert torch.equal(again["test_images"], d["test_images"])
    assert again["test_captions"] == d["test_captions"]


class _SignalsInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import signal

        import torch.utils.data as tud

        ignored = all(signal.getsignal(getattr(signal, n)) == signal.SIG_IGN
                      for n in ("SIGTERM", "SIGUSR1", "SIGINT"))
        return torch.tensor([ignored, getattr(tud.get_worker_info().dataset, "chained", False)])


def _mark(worker_id):
    torch.utils.data.get_worker_info().dataset.chained = True


def test_seeded_loader_workers_ignore_stop_signals_and_run_a_given_init():
    from stepkit.data import seeded_loader

    (batch,) = list(seeded_loader(_SignalsInWorker(), seed=0, workers=1, batch_size=2, worker_init_fn=_mark))
    assert batch.tolist() == [[True, True], [True, True]]


def test_the_digits_read_without_scikit_learn_are_scikit_learns():
    from sklearn.datasets import load_digits

    from stepkit.data.bundled import _digits

    x, y = _digits()
    expected_x, expected_y = load_digits(return_X_y=True)
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y) and x.dtype == expected_x.dtype
