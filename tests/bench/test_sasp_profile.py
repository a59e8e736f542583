"""bench/sasp_profile.py (issue 19): SAS-P against pre-LN steps timed in one process, its ratios those of its
own medians, and its profile rows the operators both models ran."""

from __future__ import annotations

import pytest


def test_speedup_is_the_ratio_of_its_medians_and_the_profile_names_the_attention_ops(capsys):
    from bench.sasp_profile import run

    out = run(["--trials", "3", "--cases", "tiny_image", "--profile", "1"])
    r = out["cases"]["tiny_image"]
    assert out["threads"] == 1 and out["clock"] == "process_time" and r["trials"] == 3
    assert r["speedup"] == pytest.approx(r["ms"]["preln"] / r["ms"]["sasp"], abs=2e-3)
    assert r["paired_ratio_iqr"][0] <= r["paired_ratio_median"] <= r["paired_ratio_iqr"][1]
    total, *rows = r["profile"]
    assert total["op"] == "(all operators)" and total["preln_ms"] > 0 and total["sasp_ms"] > 0
    # SAS-P's per-head α, β, γ and C·x: elementwise products that pre-LN blocks do not have
    mul = next((row for row in rows if row["op"] == "aten::mul"), None)
    assert mul is not None and mul["sasp_calls"] > mul["preln_calls"]
    assert "tiny_image" in capsys.readouterr().err


def test_an_unknown_case_is_refused_with_the_list():
    from bench.sasp_profile import run

    with pytest.raises(SystemExit):
        run(["--cases", "huge_model"])
