"""bench-peer's report: each ratio of means comes with a 95% bootstrap interval over seeds, wide where the seeds
spread, clear of 1 where one tool is ahead on every seed, and absent where a tool has one seed."""

from bench.peer import RATIOS, interval_lines, ratio_intervals, ratios


def run(tool: str, value: float, set_name: str = "emoji") -> dict:
    figures = {"top1": value}
    return {"set": set_name, "tool": tool, "samples_per_s": 100 * value,
            "shared": {"group": figures, "subgroup": figures, "retrieval": {"i2t_r1": value, "t2i_r1": value}}}


def test_ahead_on_every_seed_gives_an_interval_above_one():
    runs = [run("siclip", v) for v in (0.10, 0.11, 0.12)] + [run("open_clip", v) for v in (0.05, 0.055, 0.06)]
    ratio, ci = ratios(runs)["emoji"], ratio_intervals(runs)["emoji"]
    assert set(ci) == set(RATIOS)
    for name in RATIOS:
        lo, hi = ci[name]
        assert 1 < lo <= ratio[name] <= hi
        assert hi < 2.5


def test_seeds_that_overlap_give_an_interval_across_one():
    runs = [run("siclip", v) for v in (0.03, 0.05, 0.04, 0.06)]
    runs += [run("open_clip", v) for v in (0.05, 0.03, 0.06, 0.04)]
    lo, hi = ratio_intervals(runs)["emoji"]["zeroshot_subgroup_top1"]
    assert lo < 1 < hi and hi - lo > 0.3
    assert ratio_intervals(runs) == ratio_intervals(runs)  # a fixed draw: the same figures each time


def test_one_seed_has_no_interval_and_a_missing_tool_no_set():
    runs = [run("siclip", 0.1), run("open_clip", 0.05), run("siclip", 0.1, "transparent")]
    assert ratio_intervals(runs) == {"emoji": {name: None for name in RATIOS}}
    line = interval_lines(ratios(runs), ratio_intervals(runs), "siclip")
    assert line == ("siclip / open_clip, emoji (95% bootstrap over seeds): " +
                    ", ".join(f"{name} 2.0×" for name in RATIOS))
