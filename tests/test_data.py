"""stepkit.data: a user's arrays (stimulus / fMRI .npz), time blocks, the resumable sampler, loaders."""

import numpy as np
import pytest
import torch

from stepkit.data import load_fmri_npz, time_blocks


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


