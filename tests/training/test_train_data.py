"""siclip.training.data: the epoch plan from the manifests, webdataset workers, sidecar joins, exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from siclip.manifests.errors import SiclipError
from siclip.training.data import (SampleSettings, all_shards, check_shards_intact, check_sidecars, plan_epoch, split_shards,
                           train_loader)
from train_helpers import QUADRANTS, key_of, make_root

SIZES = [7, 12, 5, 9, 11, 3, 8]  # uneven shards, more of them than workers


def settings(**kw) -> SampleSettings:
    base = dict(seed=3, image_size=16, context_length=16, synthetic_captions=0, crop_scale=(1.0, 1.0))
    return SampleSettings(**{**base, **kw})


def epoch_keys(root, shards, world=1, rank=0, workers=3, batch=4, epoch=0, start=0, s=None, buffer=16):
    """The keys of each step this process trains on, from `start` to the end of the epoch."""
    plan = plan_epoch(shards, 3, epoch, rank, world, workers, batch)
    loader = train_loader(root, plan, s or settings(), batch, buffer, start)
    steps = []
    for batch_ in loader:
        if len(steps) + start == plan.steps:
            break
        steps.append(batch_["keys"])
    return plan, steps


def test_an_epoch_uses_each_sample_at_most_once_and_its_length_comes_from_the_manifest(tmp_path):
    root = make_root(tmp_path, SIZES)
    shards = all_shards(root)
    plan, steps = epoch_keys(root, shards)
    # three workers each drop only their own remainder (< one batch)
    assert plan.steps == sum(plan.batches) == len(steps)
    assert sum(plan.batches) * 4 > sum(SIZES) - 3 * 4
    keys = [k for step in steps for k in step]
    assert len(keys) == len(set(keys)) == plan.steps * 4
    assert set(keys) <= {key_of(s, i) for s, n in enumerate(SIZES) for i in range(n)}
    # the deal balances samples over the workers
    loads = [sum(s.samples for s in part) for part in plan.workers]
    assert max(loads) - min(loads) <= max(SIZES)


def test_the_order_is_deterministic_from_the_seed_and_changes_with_the_epoch(tmp_path):
    root = make_root(tmp_path, SIZES)
    shards = all_shards(root)
    _, first = epoch_keys(root, shards)
    _, again = epoch_keys(root, shards)
    _, next_epoch = epoch_keys(root, shards, epoch=1)
    assert first == again
    assert first != next_epoch and len(first) == len(next_epoch)


@pytest.mark.parametrize("start", [1, 4, 5])
def test_resuming_at_any_step_continues_with_the_exact_next_batch(tmp_path, start):
    root = make_root(tmp_path, SIZES)
    shards = all_shards(root)
    _, whole = epoch_keys(root, shards)
    _, rest = epoch_keys(root, shards, start=start)
    assert rest == whole[start:]


def test_two_processes_read_disjoint_halves_and_take_the_same_number_of_steps(tmp_path):
    root = make_root(tmp_path, SIZES)
    shards = all_shards(root)
    p0, s0 = epoch_keys(root, shards, world=2, rank=0, workers=2)
    p1, s1 = epoch_keys(root, shards, world=2, rank=1, workers=2)
    assert p0.steps == p1.steps == len(s0) == len(s1)
    k0, k1 = {k for s in s0 for k in s}, {k for s in s1 for k in s}
    assert not k0 & k1
    assert {sh.name for part in p0.workers for sh in part}.isdisjoint({sh.name for part in p1.workers for sh in part})


def test_fewer_shards_than_workers_starts_fewer_workers_and_says_so(tmp_path):
    root = make_root(tmp_path, [10, 9])
    plan, steps = epoch_keys(root, all_shards(root), workers=4)
    assert len(plan.workers) == 2 and "2 shard(s) for 4 loader workers" in plan.note
    assert len(steps) == plan.steps == 2 + 2


def test_fewer_shards_than_processes_stripes_samples_across_them(tmp_path):
    root = make_root(tmp_path, [13])
    shards = all_shards(root)
    p0, s0 = epoch_keys(root, shards, world=2, rank=0, batch=3)
    p1, s1 = epoch_keys(root, shards, world=2, rank=1, batch=3)
    assert p0.stripe and "every 2th sample" in p0.note
    assert p0.steps == p1.steps == 2  # rank 0 keeps 7 samples, rank 1 six: two batches of three each
    assert not {k for s in s0 for k in s} & {k for s in s1 for k in s}


def test_synthetic_captions_are_joined_by_key_and_missing_ones_are_counted(tmp_path):
    missing = {key_of(0, 2), key_of(1, 0), key_of(1, 3)}
    root = make_root(tmp_path, [6, 6], captions=3, missing_captions=missing)
    shards = all_shards(root)
    s = settings(synthetic_captions=2, captions=True)
    plan = plan_epoch(shards, 3, 0, 0, 1, 1, 4)
    batches = list(train_loader(root, plan, s, 4, 16))
    seen_missing = 0
    for b in batches:
        seen_missing += b["no_synthetic"]
        for key, caps, valid in zip(b["keys"], b["synthetic"], b["syn_valid"]):
            if key in missing:
                assert caps == [] and not valid.any()
            else:
                assert len(set(caps)) == 2 and all(c.endswith(f"of {key}") for c in caps) and valid.all()
    used = {k for b in batches for k in b["keys"]}
    assert seen_missing == len(missing & used) > 0


def test_teacher_rows_follow_the_view_the_loader_replays(tmp_path):
    root = make_root(tmp_path, [8, 8], captions=2, teacher_views=4)
    shards = all_shards(root)
    s = settings(synthetic_captions=1, captions=True, teacher=True, image_size=32)
    batches = list(train_loader(root, plan_epoch(shards, 3, 0, 0, 1, 2, 4), s, 4, 16))
    views = Counter()
    for b in batches:
        for i in range(len(b["keys"])):
            view = int(b["t_image"][i].argmax())  # the sidecar's view v has embedding e_v
            assert 1 <= view <= 4, "with recorded augmentations the loader uses one of them"
            colour = b["pixels"][i].float().mean(dim=(1, 2)).numpy()
            nearest = int(np.argmin([np.abs(colour - np.array(c)).sum() for c in QUADRANTS]))
            assert nearest == view - 1, f"pixels show quadrant {nearest}, the teacher row is view {view}"
            syn_text = int(b["t_syn"][i, 0].argmax())
            assert b["t_syn_valid"][i, 0] and b["synthetic"][i][0].startswith(f"synthetic {syn_text - 1} ")
            assert int(b["t_text"][i].argmax()) == 0  # the web caption's embedding is text row 0
        views.update(int(v) for v in b["t_image"].argmax(dim=1))
    assert len(views) >= 3  # views are drawn per sample, not one for all


def samples_of(root, s: SampleSettings) -> list[tuple[torch.Tensor, int]]:
    """(pixels, the teacher image row's view or -1) of every sample of one epoch."""
    plan = plan_epoch(all_shards(root), 3, 0, 0, 1, 1, 4)
    return [(b["pixels"][i], int(b["t_image"][i].argmax()) if "t_image" in b else -1)
            for b in train_loader(root, plan, s, 4, 16, in_process=True) for i in range(len(b["keys"]))]


def colour_at(pixels: torch.Tensor, columns: slice) -> int:
    """The quadrant colour nearest the mean of these columns of the upper half of the pixels."""
    mean = pixels[:, : pixels.shape[1] // 2, columns].float().mean(dim=(1, 2)).numpy()
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in QUADRANTS]))


@pytest.mark.parametrize("teacher", [False, True])
def test_a_sample_without_a_recorded_view_gets_the_random_crop_and_flip(tmp_path, teacher):
    # teacher sidecars made with `augmentations = 0` record no view: the config's crop_scale and flip apply,
    # whether or not the run reads them (every sample holds the same picture, so equal pixels mean equal views)
    root = make_root(tmp_path, [8, 8], teacher_views=0 if teacher else -1)
    cropped = samples_of(root, settings(teacher=teacher, crop_scale=(0.2, 0.5), image_size=32))
    assert len({p.numpy().tobytes() for p, _ in cropped}) > len(cropped) // 2
    assert all(v == (0 if teacher else -1) for _, v in cropped)  # the plain image's teacher row
    flipped = samples_of(root, settings(teacher=teacher, flip=True, image_size=32))
    assert len({p.numpy().tobytes() for p, _ in flipped}) == 2  # the picture and its mirror image
    plain = samples_of(root, settings(teacher=teacher, image_size=32))
    assert len({p.numpy().tobytes() for p, _ in plain}) == 1


def test_a_view_recorded_flipped_is_replayed_only_when_the_config_flips(tmp_path):
    # view 1: the top half (red | green) recorded mirrored; view 2: the bottom half (blue | yellow) as it is
    top_mirrored, bottom = [0.0, 0.0, 1.0, 0.5, 1.0], [0.0, 0.5, 1.0, 0.5, 0.0]
    root = make_root(tmp_path, [8, 8], recorded=[top_mirrored, bottom])
    left = slice(0, 8)
    with_flips = samples_of(root, settings(teacher=True, flip=True, image_size=32))
    assert {v for _, v in with_flips} == {1, 2}
    assert all(colour_at(p, left) == (1 if v == 1 else 2) for p, v in with_flips)  # view 1 mirrored: green left
    # flip = false (captions name left and right): no sample is mirrored, so the view recorded mirrored is not
    # replayed (its teacher embedding is of the mirror image), and the unmirrored one is
    no_flips = samples_of(root, settings(teacher=True, flip=False, image_size=32))
    assert all(v == 2 and colour_at(p, left) == 2 for p, v in no_flips)
    # only mirrored views recorded: the sample is one without a recorded view (plain image's row, random crop)
    root = make_root(tmp_path / "only-mirrored", [8, 8], recorded=[top_mirrored])
    only = samples_of(root, settings(teacher=True, flip=False, crop_scale=(0.2, 0.5), image_size=32))
    assert all(v == 0 for _, v in only) and len({p.numpy().tobytes() for p, _ in only}) > len(only) // 2


def test_a_shard_changed_since_its_manifest_entry_and_a_missing_sidecar_are_clear_errors(tmp_path):
    root = make_root(tmp_path, [4, 4])
    shards = all_shards(root)
    with pytest.raises(SiclipError, match=r"needs captions sidecars, but 2 of 2 shards have none \(first: 00000\)"):
        check_sidecars(root, "captions", shards, "clip_synthetic > 0")
    tar = root.shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    with pytest.raises(SiclipError, match="00001.tar is .* bytes, the manifest says"):
        check_shards_intact(shards)


def test_held_out_shards_are_never_trained_on(tmp_path):
    root = make_root(tmp_path, SIZES)
    train, val = split_shards(root, 2)
    assert [s.name for s in val] == ["00005", "00006"]
    train2, val2 = split_shards(root, ["00001"])
    assert [s.name for s in val2] == ["00001"] and "00001" not in {s.name for s in train2}
    _, steps = epoch_keys(root, train)
    assert not {k for s in steps for k in s} & {key_of(s, i) for s in (5, 6) for i in range(SIZES[s])}
    with pytest.raises(SiclipError, match="val_shards names"):
        split_shards(root, ["00009"])
    with pytest.raises(SiclipError, match="leave at least one"):
        split_shards(root, len(SIZES))


def test_val_samples_holds_out_the_last_whole_shards_that_hold_that_many_skipping_empty_ones(tmp_path):
    root = make_root(tmp_path, [50, 50, 50, 50, 2, 0])  # a short remainder, then a shard whose rows all failed
    names = lambda shards: [s.name for s in shards]  # noqa: E731
    assert names(split_shards(root, val_samples=1)[1]) == ["00004"]
    train, val = split_shards(root, val_samples=40)
    assert names(val) == ["00003", "00004"] and names(train) == ["00000", "00001", "00002", "00005"]
    assert names(split_shards(root, val_samples=52)[1]) == ["00003", "00004"]
    assert names(split_shards(root, val_samples=53)[1]) == ["00002", "00003", "00004"]
    with pytest.raises(SiclipError, match="val_samples = 160: .* hold 202 samples, too few to hold out that many"):
        split_shards(root, val_samples=160)
    with pytest.raises(SiclipError, match="val_shards = 1 holds out 00005, which hold no samples: nothing to evaluate"):
        split_shards(root, 1)
    assert names(split_shards(root, ["00000", "00005"])[1]) == ["00000", "00005"]  # an explicit list with samples


def test_val_samples_and_val_shards_together_are_one_clear_error():
    from siclip.training.config import load_train_config

    with pytest.raises(SiclipError, match=r"val_samples = 100 and val_shards = 1 both choose the held-out shards; "
                                          r"keep one \(--set val_samples=0 or --set val_shards=0\)"):
        load_train_config("tiny", ["val_shards=1"])
    assert load_train_config("tiny", ["val_shards=1", "val_samples=0"]).val_shards == 1
    assert load_train_config("tiny").val_samples == 100


def test_a_batch_too_big_for_the_data_is_refused(tmp_path):
    root = make_root(tmp_path, [3, 3])
    with pytest.raises(SiclipError, match="an epoch has no full batch"):
        plan_epoch(all_shards(root), 0, 0, 0, 1, 2, 8)


def test_pixels_are_uint8_at_the_model_size_and_tokens_end_with_the_end_token(tmp_path):
    root = make_root(tmp_path, [5])
    plan = plan_epoch(all_shards(root), 0, 0, 0, 1, 1, 5)
    (batch,) = list(train_loader(root, plan, settings(), 5, 8, in_process=True))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (5, 3, 16, 16)
    assert (batch["text"][:, 0] == 49406).all() and (batch["text"] == 49407).sum() == 5
