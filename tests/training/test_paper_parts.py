"""The paper's own parts, run for real (extra siclip[mobileclip]; `make test-mobileclip`): the s0 preset's MCi0
image tower with SAS-P blocks, inheritance from an open_clip MobileCLIP built without weights and saved, the
CLIP tokenizer against open_clip's, and paper.toml's stages on the real s0 modules."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from siclip_testing import save_open_clip, siclip, write_list
from train_helpers import assert_same_end, weights
from siclip.training.model import SASPBlock, SiCLIP, TokenBlock, build_model, count_parameters, load_config

pytestmark = pytest.mark.mobileclip

TEACHER = "MobileCLIP2-S0"  # open_clip's MCi0 + 12-layer text tower; open_clip has no MobileCLIP-S0
# the image statistics of open_clip's MobileCLIP2-S0/dfndr2b tag, recorded in the folder as its hub repository does
MOBILECLIP_PREPROCESS = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                         "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_open_clip(TEACHER, tmp_path_factory.mktemp("open_clip") / TEACHER, preprocess=MOBILECLIP_PREPROCESS)


def sasp_block_parameters(width: int, mlp_ratio: float, heads: int, value: bool, own_attention: bool = True) -> int:
    """A SAS-P block counted from its formula: one norm, W_Q and W_K (+ W_V in layer 1), α β γ per head, MLP, 2 gains."""
    hidden = int(width * mlp_ratio)
    attention = 2 * (width * width + width) + 3 * heads + (width * width if value else 0)
    return 2 * width + (attention if own_attention else 0) + 2 * width * hidden + hidden + width + 2


def test_s0_image_tower_is_mci0_with_its_last_stage_as_sasp_blocks_sharing_one_attention():
    import timm

    plain = timm.create_model("fastvit_mci0", pretrained=False, num_classes=512)
    towers = {value: build_model(load_config("s0", {"image.first_layer_value": value})).visual
              for value in (True, False)}
    stage = towers[True].trunk.stages[3]
    assert [type(b) for b in stage.blocks] == [TokenBlock, TokenBlock]
    assert all(isinstance(b.block, SASPBlock) for b in stage.blocks)
    assert stage.blocks[1].block.attn is stage.blocks[0].block.attn  # one attention, W_V included
    assert stage.blocks[0].block.attn.value is not None

    # everything but the last stage's attention blocks is timm's MCi0, tensor for tensor
    rest = {n: p.shape for n, p in plain.named_parameters() if not n.startswith("stages.3.blocks.")}
    ours = {n.removeprefix("trunk."): p.shape for n, p in towers[True].named_parameters()}
    assert {n: s for n, s in ours.items() if not n.startswith("stages.3.blocks.")} == rest

    mci0 = count_parameters(plain)
    assert round(mci0 / 1e6, 2) == 11.41  # MobileCLIP-S0's image tower, as the paper counts it
    replaced = sum(count_parameters(b) for b in plain.stages[3].blocks)
    for value, tower in towers.items():
        sasp = sasp_block_parameters(512, 3.0, 16, value) + sasp_block_parameters(512, 3.0, 16, False, own_attention=False)
        assert count_parameters(tower) == mci0 - replaced + sasp
    # 11.41M -> 10.04M (12.0% fewer) with layer 1's value projection (He & Hofmann's setting, the default);
    # 9.78M (14.3% fewer: the paper's ~14%) without it
    assert round(count_parameters(towers[True]) / 1e6, 2) == 10.04
    assert round(count_parameters(towers[False]) / 1e6, 2) == 9.78


def test_s0_trains_and_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("s0")
    pixels = torch.randn(4, 3, 256, 256)
    ids = torch.randint(1, 49406, (4, 77))
    ids[:, 0], ids[:, 12] = 49406, 49407
    image, text, scale = model(pixels, ids)
    assert image.shape == text.shape == (4, 512) and torch.isfinite(image).all() and torch.isfinite(text).all()
    logits = scale * image @ text.T
    loss = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
            + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    loss.backward()
    shared = model.visual.trunk.stages[3].blocks[0].block.attn
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert shared.q.weight.grad.abs().sum() > 0  # W_Q starts at 0 and still learns
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
    assert shared.q.weight.abs().sum() > 0

    model.eval()
    folder = model.save_pretrained(tmp_path / "s0")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = [k for k in f.keys() if k.startswith("visual.trunk.stages.3.blocks.") and k.endswith("attn.q.weight")]
    assert len(stored) == 1  # the shared attention is stored once
    loaded = SiCLIP.from_pretrained(folder).eval()
    assert loaded.visual.trunk.stages[3].blocks[1].block.attn is loaded.visual.trunk.stages[3].blocks[0].block.attn
    with torch.no_grad():
        for a, b in zip(model(pixels, ids), loaded(pixels, ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_paper_toml_stages_train_the_modules_they_name_on_the_real_s0():
    from siclip.training.config import load_train_config
    from siclip.training.step import set_trainable

    import open_clip

    from siclip.teachers import open_clip_source

    cfg = load_train_config("paper")
    # its teacher is one open_clip knows (weights by tag), with the image statistics the config feeds the student
    for spec in (cfg.inherit_from, cfg.stages[0].teacher):
        tag = open_clip.get_pretrained_cfg(*open_clip_source(spec))
        assert tag and list(tag["mean"]) == cfg.image_mean and list(tag["std"]) == cfg.image_std, spec
    model = build_model(cfg.model)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]

    def under(*prefixes):
        return {n for n in names if n.startswith(prefixes)}

    sasp = under("visual.trunk.stages.3.blocks.", *(f"text.blocks.{i}." for i in range(4)))
    assert all(isinstance(m, SASPBlock) for n, m in model.named_modules() if n.endswith(".block") and "stages.3" in n)
    by_stage = []
    for stage in cfg.stages:
        set_trainable(model, stage, set())
        by_stage.append({n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad})
    # stage 1: the new SAS-P blocks and the temperature only
    assert by_stage[0] == sasp | {"logit_scale"}
    # stage 2 adds the image tower's last expansion conv and head, and text layer 5 (with the text tower's head)
    assert by_stage[1] - by_stage[0] == under("visual.trunk.final_conv.", "visual.trunk.head.", "text.blocks.4.",
                                              "text.ln_final.", "text.proj.")


def test_inheriting_s0_from_an_open_clip_mobileclip_report_is_right_tensor_by_tensor(teacher_dir):
    from siclip.teachers import load_open_clip
    from siclip.training.inherit import from_open_clip_state, inherit_weights

    teacher = from_open_clip_state(load_open_clip(f"open_clip:{teacher_dir}")[0].state_dict())
    torch.manual_seed(0)
    student = build_model("s0")
    torch.manual_seed(0)
    fresh = build_model("s0").state_dict()
    report = inherit_weights(student, f"open_clip:{teacher_dir}")
    state = student.state_dict()
    assert report.warnings == [] and f"open_clip:{teacher_dir}" in report.teacher
    assert {e.name for e in report.entries} == set(state)
    for e in report.entries:
        layer = e.name.split(".")[2] if e.name.startswith("text.blocks.") else None
        if e.name.startswith("visual.trunk.stages.3.blocks."):  # the SAS-P image blocks: new, no such teacher tensor
            assert (e.how, e.source) == ("fresh", None), e
            assert e.note == "no teacher tensor of this name" or "shares" in e.note, e
        elif layer in ("0", "1", "2", "3"):  # the SAS-P text layers: new modules
            assert (e.how, e.source) == ("fresh", None), e
            assert "SAS-P block (new module)" in e.note or "shares" in e.note
        elif layer in ("4", "5"):  # 6 student layers from 12: layer i <- teacher layer 2i
            source = e.name.replace(f"text.blocks.{layer}.", f"text.blocks.{2 * int(layer)}.")
            assert (e.how, e.source) == ("copied", source) and f"teacher layer {2 * int(layer)}" in e.note, e
        else:
            assert (e.how, e.source) == ("copied", e.name), e
        if e.how == "copied":
            torch.testing.assert_close(state[e.name], teacher[e.source].to(state[e.name].dtype), rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[e.name], fresh[e.name], rtol=0, atol=0)
    counts = report.counts()
    assert counts["copied"] == sum(1 for e in report.entries if not e.name.startswith(
        ("visual.trunk.stages.3.blocks.", "text.blocks.0.", "text.blocks.1.", "text.blocks.2.", "text.blocks.3.")))


def test_a_preln_student_of_the_teachers_shape_reproduces_the_teachers_embeddings(teacher_dir):
    from siclip.teachers import load_open_clip
    from siclip.training.inherit import inherit_weights

    teacher, _, tokenizer = load_open_clip(f"open_clip:{teacher_dir}")
    s0 = load_config("s0")
    config = dataclasses.replace(
        s0, name="mobileclip2_s0_shape",
        image=dataclasses.replace(s0.image, block="preln", share_attention=[]),  # timm's own attention blocks
        text=dataclasses.replace(s0.text, depth=12, block="preln", share_attention=[]))
    student = build_model(config)
    report = inherit_weights(student, f"open_clip:{teacher_dir}")
    assert set(report.counts()) == {"copied"}
    student.eval()
    torch.manual_seed(1)
    pixels = torch.rand(3, 3, 256, 256)
    texts = ["a photo of a dog", "two red cars parked by the sea at night", "x"]
    with torch.no_grad():
        torch.testing.assert_close(student.encode_image(pixels), teacher.encode_image(pixels, normalize=True),
                                   rtol=0, atol=1e-5)
        ids = tokenizer(texts)
        torch.testing.assert_close(student.encode_text(ids), teacher.encode_text(ids, normalize=True), rtol=0, atol=1e-5)


def test_the_tokenizer_gives_open_clips_ids(tokenizer):
    import random

    import open_clip

    theirs = open_clip.get_tokenizer("ViT-B-32")
    rng = random.Random(0)
    pieces = ["a photo of", "A DOG", "women’s shoes", "l’été à Paris", "ﬁne ﬂowers", "ＦＵＬＬ　ｗｉｄｔｈ",
              "Cafe\u0301 au lait", "Tom &amp; Jerry &lt;3", "&quot;quoted&quot;",
              "twice &amp;amp; &amp;quot;escaped&amp;quot;", "emoji 😀🐕‍🦺👍🏽", "日本語のテキスト", "Ελληνικά",
              "русский текст", "مرحبا", "IMG_2024-01-01.jpg", "http://example.com/a?b=c&d=e", "don't won't it's",
              "2,500 $ 3.14 50%", "   spaced\t\tout\n\nlines  ", "ÃƒÂ© mojibake", "#hashtag @user", "<b>bold</b>",
              "-- -- --", "CamelCaseWords", "x" * 300, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "", "ok!!!???", "a.b.c",
              "résumé naïve coöperate", "\u00a0non-breaking\u2009thin"]
    texts = list(pieces)
    while len(texts) < 300:
        texts.append(" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))))
    assert max(len(t) for t in texts) > 1000  # truncation exercised
    for context in (77, 16):
        ours, reference = tokenizer(texts, context_length=context), theirs(texts, context_length=context)
        mismatched = [t for t, a, b in zip(texts, ours, reference) if not torch.equal(a, b)]
        assert not mismatched, f"{len(mismatched)} of {len(texts)} differ at context {context}, e.g. {mismatched[0]!r}"


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory, teacher_dir):
    """A data root made by the real stages: 3 shards of generated pictures (stage 1, img2dataset on loopback),
    3 synthetic captions each (the tiny captioner) and teacher sidecars from the open_clip teacher folder."""
    from demo.loopback import serve_generated

    d = tmp_path_factory.mktemp("paper_data")
    with serve_generated(48, seed=7) as (server, rows):
        urls = write_list(d / "urls.parquet", [(f"{server.base}/{p}", c) for p, c in rows])
        siclip("shards", "--urls", urls, "--data", d / "data", "--image-size", "64", "--samples-per-shard", "16",
               "--processes", "2", "--threads", "8", "--budget", "8GB", "--reserve", "0%", "--set", "timeout=20",
               "--allow-private-addresses")
    siclip("captions", "--data", d / "data", "--model", "tiny", "--workers", "0", "--num-captions", "3",
           "--max-new-tokens", "12")
    siclip("teacher", "--data", d / "data", "--teacher", f"open_clip:{teacher_dir}", "--workers", "0",
           "--augmentations", "1")
    return d / "data"


def paper_sets(teacher: str) -> list[str]:
    """paper.toml as it is, shortened to 2 + 2 steps of 8 on a CPU, the teacher a local folder (no download)."""
    sets = [f"inherit_from={teacher}", f"stages.0.teacher={teacher}", "batch_size=8", "micro_batch=4", "workers=1",
            "val_samples=16", "shuffle_buffer=16", "checkpoint_every=1", "keep_checkpoints=4", "eval_every=0", "log_every=1",
            "record_keys=true", "pm_k=4"]
    for i in (0, 1):
        sets += [f"stages.{i}.epochs=0", f"stages.{i}.steps=2", f"stages.{i}.warmup_steps=1"]
    return [a for s in sets for a in ("--set", s)]


def test_paper_toml_trains_s0_from_an_open_clip_teacher_with_every_term_and_resumes_after_a_kill(
        paper_data, teacher_dir, tmp_path):
    import os
    import shutil
    import signal

    from siclip.manifests.layout import DataRoot
    from siclip.teachers import load_open_clip
    from siclip.training.inherit import from_open_clip_state

    root = DataRoot(tmp_path / "data")
    shutil.copytree(paper_data, root.root)
    teacher = f"open_clip:{teacher_dir}"
    args = ["train", "--data", root.root, "--config", "paper", *paper_sets(teacher)]
    res = siclip(*args, "--out", "whole", timeout=1200)
    run = root.runs / "whole"
    assert f"teacher: open_clip {teacher}" in res.stderr and "teacher: teacher sidecars" in res.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    every = {"clip_web", "clip_synthetic", "pm", "fd", "crd", "icl"}
    assert [(r["stage"], set(r["terms"])) for r in records if "terms" in r] == \
        [("new-blocks", every)] * 2 + [("reinforced", every)] * 2
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    s0 = build_model("s0")
    sasp = ("visual.trunk.stages.3.blocks.", *(f"text.blocks.{i}." for i in range(4)))
    report = json.loads((run / "inherit_report.json").read_text())
    assert report["teacher"] == teacher and not report["warnings"]
    assert report["counts"] == {"copied": sum(not n.startswith(sasp) for n in s0.state_dict()),
                                "fresh": sum(n.startswith(sasp) for n in s0.state_dict())}

    # stage 1 moved only the SAS-P blocks (and the temperature): every other parameter is still the teacher's;
    # stage 2 moved the image tower's last expansion conv and head and text layer 5 too, not its stem
    teacher_state = from_open_clip_state(load_open_clip(teacher)[0].state_dict())
    parameters = {n for n, _ in s0.named_parameters()}
    stage1, final = weights(run / "checkpoints" / "step-000002"), weights(run / "final")
    for name in parameters:
        if name.startswith(sasp) or name == "logit_scale":
            continue
        source = name.replace("text.blocks.4.", "text.blocks.8.").replace("text.blocks.5.", "text.blocks.10.")
        assert torch.equal(stage1[name], teacher_state[source]), name
    for prefix in sasp + ("visual.trunk.final_conv.", "visual.trunk.head.", "text.blocks.4."):
        assert not all(torch.equal(stage1[n], final[n]) for n in parameters if n.startswith(prefix)), prefix
    assert all(torch.equal(stage1[n], final[n]) for n in parameters if n.startswith(("visual.trunk.stem.", "text.blocks.5.")))

    # killed (kill -9) in stage 1 past its first checkpoint (its loss terms' projections have moved), resumed across
    # the stage boundary: the same end, sample for sample
    env = {**os.environ, "SICLIP_FAILPOINT": "logged:step-000002"}
    res = siclip(*args, "--out", "killed", check=False, env=env, timeout=1200)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = siclip(*args, "--out", "killed", "--resume", timeout=1200)
    assert "resuming from step-000001" in res.stderr
    assert_same_end(run, root.runs / "killed")


def test_the_bench_measures_s0s_image_tower_against_timms_mci0():
    import timm

    from bench.blocks import build_towers, replaced_blocks

    towers = build_towers("s0_image")
    plain = timm.create_model("fastvit_mci0", pretrained=False, num_classes=512)
    assert count_parameters(towers["preln"]) == count_parameters(plain)
    assert [type(b).__name__ for b in replaced_blocks(towers["preln"])] == ["AttentionBlock"] * 2
    assert count_parameters(towers["sasp"]) == count_parameters(build_model("s0").visual)
    assert [type(b.block) for b in replaced_blocks(towers["sasp"])] == [SASPBlock] * 2
