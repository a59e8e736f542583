"""Stage 1's config (pipeline/config.py): defaults < TOML file < --set < flags; every bad value is refused in one
line before anything runs."""

from __future__ import annotations

import pytest

from siclip.config import resolve, to_toml
from siclip.manifests.errors import SiclipError
from siclip.manifests.storage import format_size, parse_reserve, parse_size
from siclip.pipeline.config import ShardsConfig


def test_precedence_file_then_set_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('urls = "a.csv"\nimage_size = 128\nquality = 80\nthreads = 4\n')
    cfg = resolve(ShardsConfig, f, ["quality=85", "fit=true", "timeout=2"], {"threads": "8", "budget": None})
    assert (cfg.urls, cfg.image_size, cfg.quality, cfg.threads, cfg.fit, cfg.timeout, cfg.budget) == \
        ("a.csv", 128, 85, 8, True, 2.0, "1TB")


def test_unknown_key_lists_the_valid_ones(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('urls = "a.csv"\nimg_size = 128\n')
    with pytest.raises(SiclipError) as e:
        resolve(ShardsConfig, f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: unknown key 'img_size'") and "valid keys: urls, data, budget" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("item, fragment", [
    ("quality=high", "quality = 'high' is not a valid int"),
    ("quality", "expected key=value"),
    ("resize_mode=squash", "resize_mode 'squash' is not one of center_crop, border"),
    ("quality=0", "quality must be within 1..100"),
    ("processes=-1", "processes must be 0 (one per core) or more, got -1"),
    ("timeout=-1", "timeout must be more than 0 seconds, got -1.0"),
    ("timeout=0", "timeout must be more than 0 seconds, got 0.0"),
    ("retries=-1", "retries must be 0 or more, got -1"),
])
def test_bad_values_are_one_line_errors(item, fragment):
    with pytest.raises(SiclipError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve(ShardsConfig, None, [item], {"urls": "a.csv"})


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = resolve(ShardsConfig, None, ["quality=90", "fit=true"], {"urls": "x.parquet"})
    f = tmp_path / "saved.toml"
    f.write_text(to_toml(cfg))
    assert resolve(ShardsConfig, f) == cfg


def test_sizes():
    assert parse_size("1TB") == 10**12 and parse_size("1.5 GiB") == int(1.5 * 2**30) and parse_size(1234) == 1234
    assert parse_reserve("40%", 1000) == 400 and parse_reserve("100MB", 10**12) == 10**8
    assert format_size(28_700) == "28.7 KB" and format_size(356e9) == "356 GB"
    with pytest.raises(SiclipError, match="cannot read size 'lots'"):
        parse_size("lots")


@pytest.mark.parametrize("budget, reserve", [("1GB", "2GB"), ("1GB", "1GB")])
def test_a_reserve_that_leaves_no_budget_for_shards_is_refused(budget, reserve):
    with pytest.raises(SiclipError, match=f"the reserve {reserve[0]} GB leaves nothing of the budget 1 GB for the shards"):
        resolve(ShardsConfig, None, [], {"urls": "a.csv", "budget": budget, "reserve": reserve})


@pytest.mark.parametrize("name", ["pyspark", "ray"])
def test_a_distributor_is_refused_before_any_work_exactly_when_its_package_is_missing(name):
    import importlib.util

    if importlib.util.find_spec(name) is not None:  # the extra is installed here: the flag is accepted
        assert resolve(ShardsConfig, None, [f"distributor={name}"], {"urls": "a.csv"}).distributor == name
        return
    with pytest.raises(SiclipError, match=rf"--distributor {name} needs its package: pip install 'siclip\[{name}\]'"):
        resolve(ShardsConfig, None, [f"distributor={name}"], {"urls": "a.csv"})
