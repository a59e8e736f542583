"""The field's benchmarks in `siclip eval`: ImageNet's class names for folders named by WordNet id and OpenAI's 80
templates (shipped), COCO/Flickr30k retrieval from Karpathy's split files with 5 captions per image, a transformers
baseline through the same code and prompts, CLIP_benchmark's keys in the JSON, and zero-shot during training."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from siclip.manifests.errors import SiclipError
from siclip.training.evaluate import (ASSETS, karpathy_retrieval, karpathy_set, read_classnames, read_templates,
                                      retrieval_metrics, zeroshot_set)
from siclip_testing import siclip

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def image_classes(folder: Path, classes: dict[str, tuple], per_class: int = 2) -> Path:
    """A folder of class sub-folders, each holding `per_class` small PNGs of its colour."""
    for name, colour in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24, 24), tuple(max(0, c - 40 * i) for c in colour)).save(folder / name / f"{i}.png")
    return folder


# ----------------------------------------------------------------------------- the shipped lists


def test_the_shipped_lists_are_imagenets_1000_classes_and_openais_80_templates_and_a_wheel_carries_them(tmp_path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    names = read_classnames("imagenet")
    assert len(names) == 1000 and len(set(names)) == 1000
    assert list(names) == sorted(names)  # ImageNet's class index is the sorted order of its WordNet ids
    assert names["n01440764"] == "tench" and names["n01443537"] == "goldfish" and names["n15075141"] == "toilet paper"
    assert list(names.values()) == (ASSETS / "imagenet_classnames.txt").read_text().splitlines()
    openai = read_templates("openai")
    assert len(openai) == len(set(openai)) == 80 and openai[0] == "a bad photo of a {}."
    assert len(read_templates("simple")) == 7 and set(read_templates("simple")) < set(openai)
    # a set from CLIP_benchmark's template file, one per line, as it writes them
    (tmp_path / "cifar.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
    assert read_templates(tmp_path / "cifar.txt") == ["a photo of a {}.", "a blurry photo of a {}."]
    # pyproject's package-data puts every shipped list (and where it comes from) into the wheel
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    for path in ASSETS.iterdir():
        assert any(fnmatch.fnmatch(f"assets/{path.name}", p) for p in patterns), path.name
    assert "MIT" in (ASSETS / "LICENSE-imagenet-lists.txt").read_text()


def test_folders_named_by_wordnet_id_get_imagenets_class_names(tmp_path):
    # two ImageNet classes and one of ImageNet-A's 200: a subset of the synsets is named as well
    folder = image_classes(tmp_path / "val", {"n15075141": (250, 250, 250), "n01440764": (90, 120, 60),
                                              "n01443537": (255, 140, 0)})
    assert zeroshot_set(folder, "imagenet").names == ["tench", "goldfish", "toilet paper"]
    assert zeroshot_set(folder).names == ["n01440764", "n01443537", "n15075141"]  # the folder names, without
    # the forms ImageNet users have: LOC_synset_mapping.txt, a TSV, a JSON mapping, a plain list in sorted order
    forms = {"loc.txt": "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                        "n15075141 toilet tissue, toilet paper\n",
             "map.tsv": "n15075141\ttoilet roll\nn01440764\ttench\nn01443537\tgoldfish\nn99999999\tunused\n",
             "map.json": json.dumps({"n01440764": "tench", "n01443537": "goldfish", "n15075141": "toilet roll"}),
             "list.txt": "# one name per folder, in sorted order\ntench\ngoldfish\ntoilet roll\n",
             "list.json": json.dumps(["tench", "goldfish", "toilet roll"])}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
    assert zeroshot_set(folder, tmp_path / "loc.txt").names == ["tench, Tinca tinca", "goldfish, Carassius auratus",
                                                               "toilet tissue, toilet paper"]
    for name in ("map.tsv", "map.json", "list.txt", "list.json"):
        assert zeroshot_set(folder, tmp_path / name).names == ["tench", "goldfish", "toilet roll"], name


@pytest.mark.parametrize("content, says", [
    ("n01440764\ttench\n", r"no name for class folder 'n01443537' of .*val \(nor for 1 more\); it maps folder "
                           r"names such as 'n01440764'"),
    ("tench\ngoldfish\n", r"2 names for the 3 class folders of .*val \(a list names the folders in sorted order"),
    ("n01440764\ttench\ngoldfish\n", r"line 2 \('goldfish'\) is not FOLDER<TAB>NAME as the others are"),
    ('{"n01440764": 3}', "JSON must map class folder names to class names, or list the names"),
    ("", "it has no class name"),
])
def test_a_class_name_file_that_does_not_fit_the_folder_is_one_line_naming_it(tmp_path, content, says):
    folder = image_classes(tmp_path / "val", {"n01440764": (1, 2, 3), "n01443537": (4, 5, 6), "n15075141": (7, 8, 9)})
    path = tmp_path / "names.txt"
    path.write_text(content)
    with pytest.raises(SiclipError, match=rf"^classnames {path}: {says}") as e:
        zeroshot_set(folder, path)
    assert "\n" not in str(e.value)


def test_imagenets_names_refuse_folders_not_named_by_wordnet_id(tmp_path):
    folder = image_classes(tmp_path / "shapes", {"circle": (1, 2, 3), "square": (4, 5, 6)})
    with pytest.raises(SiclipError, match=r"^classnames imagenet: no name for class folder 'circle' .*such as "
                                          r"'n01440764'"):
        zeroshot_set(folder, "imagenet")
    with pytest.raises(SiclipError, match=r"^classnames imagenett: no such file, nor a shipped set \(imagenet\)$"):
        zeroshot_set(folder, "imagenett")


# ----------------------------------------------------------------------------- retrieval, several captions per image


def test_recall_counts_an_image_found_when_any_of_its_captions_ranks_in_the_top_k():
    """Three images (one-hot), two captions each; each caption's score for each image set by hand."""
    image = torch.eye(3)
    text = torch.tensor([[0.9, 0.1, 0.0],   # image 0's: its image first                    t2i rank 0
                         [0.2, 0.5, 0.3],   # image 0's: images 1 and 2 above its image     t2i rank 2
                         [0.5, 0.4, 0.1],   # image 1's: image 0 above                      t2i rank 1
                         [0.6, 0.3, 0.7],   # image 1's: images 0 and 2 above               t2i rank 2
                         [0.1, 0.2, 0.3],   # image 2's                                     t2i rank 0
                         [0.3, 0.1, 0.8]])  # image 2's                                     t2i rank 0
    text = torch.cat([text, (1 - text.pow(2).sum(1, keepdim=True)).sqrt()], dim=1)  # unit length, scores unchanged
    image = F.pad(image, (0, 1))
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    m = retrieval_metrics(image, text, owner=owner, ks=(1, 2, 3))
    assert (m["t2i_r1"], m["t2i_r2"], m["t2i_r3"]) == pytest.approx((3 / 6, 4 / 6, 1.0))
    # image 0: caption 0 scores 0.9, best of all -> found at 1; image 1: its best (0.4) is behind caption 1's 0.5
    # -> found at 2; image 2: caption 5's 0.8 is best -> found at 1
    assert (m["i2t_r1"], m["i2t_r2"]) == pytest.approx((2 / 3, 1.0))
    assert m["samples"] == 3 and m["captions"] == 6
    # CLIP_benchmark's names: image retrieval is text -> image, text retrieval image -> text
    assert m["image_retrieval_recall@1"] == m["t2i_r1"] and m["text_retrieval_recall@2"] == m["i2t_r2"]


class ByHand:
    """An encoder whose embeddings are set by hand: an image is its colour (one axis per colour), a caption the
    vector of the table above, so every rank is known."""

    name = "by hand"
    VECTORS = {"a1": [0.9, 0.1, 0.0], "a2": [0.2, 0.5, 0.3], "b1": [0.5, 0.4, 0.1], "b2": [0.6, 0.3, 0.7],
               "c1": [0.1, 0.2, 0.3], "c2": [0.3, 0.1, 0.8], "a3": [0.0, 0.0, 1.0], "x1": [1.0, 0.0, 0.0]}

    def images(self, images):
        return F.pad(torch.tensor([im.getpixel((0, 0)) for im in images], dtype=torch.float) / 255, (0, 1))

    def texts(self, texts):
        v = torch.tensor([self.VECTORS[t] for t in texts])
        return torch.cat([v, (1 - v.pow(2).sum(1, keepdim=True)).sqrt()], dim=1)


def karpathy_files(tmp_path: Path) -> tuple[Path, Path]:
    """A Karpathy split file of four images (three test, one train) and their images: one under its filepath, the
    others directly under the folder as many copies of COCO are laid out."""
    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    entries = [("val2014", "red.png", "test", ["a1", "a2", "a3"]), ("", "green.png", "test", ["b1", "b2"]),
               ("", "blue.png", "test", ["c1", "c2"]), ("", "x.png", "train", ["x1"])]
    for filepath, filename, _, _ in entries:
        colour = COLOURS.get(filename[:-4], (255, 0, 0))
        Image.new("RGB", (16, 16), colour).save(images / filepath / filename)
    data = {"dataset": "coco", "images": [
        {"filepath": fp, "filename": fn, "split": split, "sentences": [{"raw": c, "tokens": [c]} for c in caps]}
        for fp, fn, split, caps in entries]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path, images


def test_karpathy_split_retrieval_ranks_five_captions_per_image_as_the_field_does(tmp_path):
    path, images = karpathy_files(tmp_path)
    two = karpathy_set(path, images, per_image=2)  # 'a3' (the third caption) is left out, as a sixth is in COCO
    assert [p.name for p in two.images] == ["red.png", "green.png", "blue.png"] and two.dataset == "coco"
    assert two.images[0] == images / "val2014" / "red.png" and two.captions[0] == ["a1", "a2"]
    m = karpathy_retrieval(ByHand(), two, batch_size=2, progress=False)
    assert (m["t2i_r1"], m["i2t_r1"], m["t2i_r5"], m["i2t_r5"]) == pytest.approx((3 / 6, 2 / 3, 1.0, 1.0))
    assert m["image_retrieval_recall@1"] == m["t2i_r1"] and m["text_retrieval_recall@1"] == m["i2t_r1"]
    assert (m["samples"], m["captions"], m["unreadable"], m["split"]) == (3, 6, 0, "test")
    # all captions: red's third, a3, points at blue, so red ranks behind blue (and, tied, green) for it
    every = karpathy_retrieval(ByHand(), karpathy_set(path, images, per_image=0), progress=False)
    assert every["captions"] == 7 and every["t2i_r1"] == pytest.approx(3 / 7)
    # an image that does not decode is left out with its captions, and counted
    (images / "blue.png").write_bytes(b"not a PNG")
    broken = karpathy_retrieval(ByHand(), karpathy_set(path, images, per_image=2), progress=False, log=lambda m: None)
    assert (broken["samples"], broken["captions"], broken["unreadable"]) == (2, 4, 1)


def test_a_karpathy_file_that_does_not_fit_is_one_line_naming_it(tmp_path):
    path, images = karpathy_files(tmp_path)
    with pytest.raises(SiclipError, match=rf"^--retrieval-json {path}: no image of split 'val' \(its splits: test, "
                                          r"train\)$"):
        karpathy_set(path, images, split="val")
    (images / "green.png").unlink()
    with pytest.raises(SiclipError, match=rf"^--images {images}: 1 of the 3 test images of dataset_coco.json are not "
                                          rf"there \(the first: {images / 'green.png'}, nor directly under --images\)$"):
        karpathy_set(path, images)
    path.write_text('{"annotations": []}')
    with pytest.raises(SiclipError, match=r"no 'images' list \(Karpathy's split files, dataset_coco.json, have one\)"):
        karpathy_set(path, images)


# ----------------------------------------------------------------------------- a baseline, the same way


@pytest.fixture
def hf_clip_folder(hf_teacher_dir, tmp_path) -> Path:
    """The tiny transformers CLIPModel with a tokenizer and an image processor, as a hub folder has them."""
    from siclip.training.export import write_image_processor, write_tokenizer

    folder = tmp_path / "hf-clip"
    shutil.copytree(hf_teacher_dir, folder)
    write_tokenizer(folder, 77)
    write_image_processor(folder, 32, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    return folder


def test_a_transformers_baseline_goes_through_the_same_prompts_and_gives_clip_benchmarks_keys(tmp_path, hf_clip_folder):
    """`siclip eval --model hf:FOLDER`, no hub: its zero-shot top-1 is what transformers itself predicts with
    ImageNet's names in the two templates, and its JSON carries CLIP_benchmark's keys beside siclip's."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = image_classes(tmp_path / "val", {"n01440764": (90, 120, 60), "n01443537": (255, 140, 0)}, per_class=3)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    path, images = karpathy_files(tmp_path)
    res = siclip("eval", "--model", f"hf:{hf_clip_folder}", "--imagefolder", folder, "--classnames", "imagenet",
                 "--templates", templates, "--retrieval-json", path, "--images", images, "--json")
    out = json.loads(res.stdout)
    assert set(out) == {"zeroshot", "retrieval_json"}
    zs, rj = out["zeroshot"], out["retrieval_json"]
    assert (zs["acc1"], zs["acc5"]) == (zs["top1"], zs["top5"]) and zs["images"] == 6 and "mean_per_class_recall" in zs
    for k in (1, 5, 10):
        assert rj[f"image_retrieval_recall@{k}"] == rj[f"t2i_r{k}"] and rj[f"text_retrieval_recall@{k}"] == rj[f"i2t_r{k}"]
    assert (rj["dataset"], rj["split"], rj["samples"], rj["captions"]) == ("coco", "test", 3, 7)

    # transformers alone: the class embedding is the mean of its normalised prompt embeddings
    model = CLIPModel.from_pretrained(hf_clip_folder).eval()
    tok, proc = CLIPTokenizer.from_pretrained(hf_clip_folder), CLIPImageProcessor.from_pretrained(hf_clip_folder)

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        classes = []
        for name in ("tench", "goldfish"):
            ids = tok([f"a photo of a {name}.", f"a drawing of a {name}."], padding=True, return_tensors="pt")
            classes.append(F.normalize(F.normalize(features(model.get_text_features(**ids)), dim=-1).mean(0), dim=-1))
        files = sorted(folder.glob("*/*.png"))
        pixels = proc(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
        predicted = (features(model.get_image_features(pixel_values=pixels)) @ torch.stack(classes).T).argmax(1)
    truth = torch.tensor([0 if f.parent.name == "n01440764" else 1 for f in files])
    assert zs["top1"] == pytest.approx(float((predicted == truth).float().mean()))


def test_a_baseline_retrieves_on_shards_through_its_own_preprocessing(tmp_path, hf_clip_folder):
    from train_helpers import make_root

    from siclip.teachers import load_teacher, parse_teacher
    from siclip.training.data import all_shards
    from siclip.training.evaluate import TeacherEncoder, shard_retrieval

    root = make_root(tmp_path / "data", [6, 5])
    encoder = TeacherEncoder(load_teacher(parse_teacher(f"hf:{hf_clip_folder}")))
    m = shard_retrieval(encoder, all_shards(root), batch_size=4)
    assert m["samples"] == 11 and m["unreadable"] == 0 and 0 <= m["t2i_r1"] <= m["t2i_r5"] <= m["t2i_r10"] <= 1
    assert m["text_retrieval_recall@5"] == m["i2t_r5"] and "captions" not in m  # one web caption per image


def test_a_model_that_cannot_be_evaluated_is_one_line(tmp_path):
    folder = image_classes(tmp_path / "shapes", {"circle": (1, 2, 3), "square": (4, 5, 6)})
    for model, says in ((f"hf:{tmp_path / 'nothing'}", f"no such folder: {tmp_path / 'nothing'}"),
                        ("tiny", "'tiny' is not a model to evaluate")):
        res = siclip("eval", "--model", model, "--imagefolder", folder, check=False)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr and says in last, res.stderr[-2000:]
    res = siclip("eval", "--model", "hf:openai/clip-vit-base-patch32", check=False)  # no task: nothing is loaded
    assert res.returncode == 2 and "a baseline has no held-out shards; give --imagefolder" in res.stderr


@pytest.mark.mobileclip
def test_an_open_clip_baseline_goes_through_the_same_code(tmp_path):
    """`--model open_clip:FOLDER` (open_clip's hub layout, tiny random weights): zero-shot and retrieval figures."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**cfg)
    hub = tmp_path / "oc"
    hub.mkdir()
    save_file(model.state_dict(), hub / "open_clip_model.safetensors")
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    folder = image_classes(tmp_path / "shapes", {"circle": (1, 2, 3), "square": (200, 5, 6)})
    path, images = karpathy_files(tmp_path)
    res = siclip("eval", "--model", f"open_clip:{hub}", "--imagefolder", folder, "--templates", "simple",
                 "--retrieval-json", path, "--images", images, "--json")
    out = json.loads(res.stdout)
    assert out["zeroshot"]["images"] == 4 and out["zeroshot"]["acc1"] == out["zeroshot"]["top1"]
    assert out["retrieval_json"]["captions"] == 7 and 0 <= out["retrieval_json"]["image_retrieval_recall@1"] <= 1


# ----------------------------------------------------------------------------- a siclip run, and during training


def test_a_run_evaluates_imagenet_folders_with_openais_templates_and_prints_a_table(tmp_path):
    from siclip.training.model import build_model

    torch.manual_seed(0)
    build_model("tiny").save_pretrained(tmp_path / "run" / "final")
    folder = image_classes(tmp_path / "val", {"n01440764": (90, 120, 60), "n01443537": (255, 140, 0)})
    path, images = karpathy_files(tmp_path)
    args = ["eval", "--model", tmp_path / "run", "--imagefolder", folder, "--classnames", "imagenet", "--templates",
            "openai", "--retrieval-json", path, "--images", images]
    out = json.loads(siclip(*args, "--json").stdout)
    assert out["zeroshot"]["classes"] == 2 and out["zeroshot"]["acc1"] == out["zeroshot"]["top1"]
    assert out["retrieval_json"]["samples"] == 3 and "retrieval" not in out
    table = siclip(*args).stdout
    assert "coco test" in table and "(7 captions)" in table and "text -> image" in table


def test_zeroshot_every_logs_zero_shot_into_the_eval_records_the_plots_draw(tmp_path):
    from test_train_start import config, train
    from train_helpers import make_root

    from siclip.training.plots import eval_figure

    root = make_root(tmp_path / "data", [16, 16, 16])
    image_classes(root.root / "classes", {"red": (255, 0, 0), "blue": (0, 0, 255)})
    body = 'val_shards = 1\nzeroshot_every = 2\nzeroshot_folders = ["classes"]\nzeroshot_templates = "simple"'
    res = train(root, config(tmp_path, "zs", body, steps=3), "run", "--json")
    evals = [r for r in map(json.loads, (root.runs / "run" / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    # zero-shot at step 2 (its cadence) and at the end, where it joins the held-out retrieval in one record
    assert [(r["step"], sorted(k for k in r["eval"] if k in ("zeroshot", "i2t_r1"))) for r in evals] == \
        [(2, ["zeroshot"]), (3, ["i2t_r1", "zeroshot"])]
    zs = evals[-1]["eval"]["zeroshot"]
    assert zs["classes"] == 2 and zs["images"] == 4 and zs["acc1"] == zs["top1"]
    summary = json.loads(res.stdout)
    assert summary["eval"]["zeroshot"] == zs and "held-out retrieval i2t R@1" in res.stderr
    fig = eval_figure([r for r in map(json.loads, (root.runs / "run" / "metrics.jsonl").read_text().splitlines())], [])
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["zero-shot top-1", "zero-shot top-5"]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [2, 3]


def test_zero_shot_settings_that_cannot_work_stop_the_run_before_it_starts(tmp_path):
    from test_train_start import config, train
    from train_helpers import make_root

    from siclip.training.config import load_train_config

    with pytest.raises(SiclipError, match="zeroshot_every and zeroshot_folders go together"):
        load_train_config(config(tmp_path, "a", 'zeroshot_every = 2'))
    with pytest.raises(SiclipError, match="zeroshot_every and zeroshot_folders go together"):
        load_train_config(config(tmp_path, "b", 'zeroshot_folders = ["x"]'))
    root = make_root(tmp_path / "data", [16, 16])
    nope = tmp_path / "nope"
    res = train(root, config(tmp_path, "c", f'zeroshot_every = 1\nzeroshot_folders = ["{nope}"]'), "run", check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].endswith(f"zeroshot_folders {nope}: not a folder")
    assert not (root.runs / "run").exists()
