"""A trained siclip model as a Hugging Face folder that loads without siclip.

Two forms. A model that a transformers `CLIPModel` holds exactly (a ViT and a causal text tower of standard pre-LN
blocks without sharing: a teacher's shape) becomes a plain CLIPModel folder, the reverse of
`inherit.from_transformers_state`: config.json, model.safetensors, a CLIPTokenizer's vocab.json/merges.txt made
from the shipped BPE merge list and a CLIPImageProcessor with the run's image size, mean and std. It loads anywhere
through `CLIPModel.from_pretrained`, `AutoTokenizer` and `AutoImageProcessor`: as a `siclip teacher --teacher`, an
`inherit_from`, or a stage's online teacher. Every other model (SAS-P blocks, shared attention, a bidirectional
text tower, the MCi0 image tower), and a pre-LN one with `remote_code=True`, becomes a remote-code folder:
`modeling_siclip.py` (a copy of `hf_modeling.py`, which imports torch and transformers only), config.json whose
`auto_map` names it, the weights under siclip's own names (shared attention stored once), the CLIPTokenizer files
(padding with id 0, as siclip pads) and siclip's own image preprocessing (the centered square, bicubic, the run's
mean and std; alpha onto white). `AutoModel`/`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` load
it and embed as siclip does.

Inside a data root the folder is published like a checkpoint (written aside, `state.json` last, renamed)
and recorded in the `train` manifest, so it counts against the storage budget; a rerun that finds the
same source exported already skips.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path

from siclip.manifests.errors import SiclipError
from siclip.training.inherit import siclip_name
from siclip.training.model import SiCLIP, SiCLIPConfig, block_types

EXPORT_KIND = "export"
REMOTE_CODE = "remote-code"  # the record's `format` of a remote-code export (a CLIPModel's record has none)
MODULE = "modeling_siclip"  # hf_modeling.py as the folder ships it
MODELING_FILE = f"{MODULE}.py"
TEMPLATE = Path(__file__).parent / "hf_modeling.py"
PAD = "!"  # id 0: siclip pads texts with it, and a bidirectional tower that attends to its padding sees it


def clip_model_problems(cfg: SiCLIPConfig) -> list[str]:
    """Why a transformers CLIPModel cannot hold the model exactly (empty: it can)."""
    problems = []
    if cfg.image.kind != "vit":
        problems.append(f"its image tower is {cfg.image.kind!r}, not a ViT")
    for name, tower in (("image", cfg.image), ("text", cfg.text)):
        if tower.share_attention:
            problems.append(f"its {name} tower shares attention")
        if cfg.image.kind == "vit" or name == "text":
            kinds = sorted(set(block_types(tower)) - {"preln"})
            if kinds:
                problems.append(f"its {name} tower has {'/'.join(kinds)} blocks")
    if not cfg.text.causal:
        problems.append("its text tower is bidirectional (CLIPModel's is causal)")
    return problems


def check_exportable(cfg: SiCLIPConfig) -> None:
    """A one-line error unless CLIPModel can hold the model exactly."""
    problems = clip_model_problems(cfg)
    if problems:
        raise SiclipError(f"model {cfg.name!r} does not export to a transformers CLIPModel: {'; '.join(problems)} "
                          f"(only pre-LN ViT teachers do; the remote-code export holds every model)")


def clip_config(cfg: SiCLIPConfig):
    """The transformers CLIPConfig of a pre-LN siclip model."""
    from transformers import CLIPConfig

    from siclip.training.tokenizer import EOT, SOT, ClipTokenizer

    check_exportable(cfg)
    v, t = cfg.image, cfg.text
    tok = ClipTokenizer()
    return CLIPConfig(
        projection_dim=cfg.embed_dim, logit_scale_init_value=cfg.init_logit_scale,
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                           num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                           patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.ln_eps),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                         num_hidden_layers=t.depth, num_attention_heads=t.heads,
                         max_position_embeddings=t.context_length, hidden_act=t.act, layer_norm_eps=t.ln_eps,
                         bos_token_id=tok.encoder[SOT], eos_token_id=t.eot_token_id, pad_token_id=tok.encoder[EOT]))


def to_transformers(model: SiCLIP):
    """A CLIPModel holding exactly the siclip model's weights."""
    from transformers import CLIPModel

    clip = CLIPModel(clip_config(model.config)).eval()
    ours = model.state_dict()
    state = {}
    for name, tensor in clip.state_dict().items():
        if name.endswith("position_ids"):  # a buffer of CLIPModel's own
            state[name] = tensor
            continue
        source = siclip_name(name)
        if source not in ours or ours[source].shape != tensor.shape:
            raise SiclipError(f"export: CLIPModel's {name} {list(tensor.shape)} has no counterpart in the siclip "
                              f"model (looked for {source})")
        state[name] = ours[source].detach().to(tensor.dtype)
    clip.load_state_dict(state, strict=True)
    return clip


def to_remote_code(model: SiCLIP):
    """hf_modeling's SiCLIPModel holding exactly the siclip model's weights."""
    from siclip.training.hf_modeling import SiCLIPConfig as HFConfig, SiCLIPModel

    payload = dataclasses.asdict(model.config)
    auto_map = {"AutoConfig": f"{MODULE}.SiCLIPConfig", "AutoModel": f"{MODULE}.SiCLIPModel"}
    config = HFConfig(**payload, auto_map=auto_map)
    hf = SiCLIPModel(config).eval()
    ours, theirs = model.state_dict(), hf.state_dict()
    kept = {ours[name].data_ptr() for name in theirs if name in ours}
    left = [name for name, tensor in ours.items() if name not in theirs and tensor.data_ptr() not in kept]
    missing = [name for name in theirs if name not in ours or ours[name].shape != theirs[name].shape]
    if missing or left:  # hf_modeling.py out of step with model.py: a bug, named
        raise SiclipError(f"export: {MODELING_FILE} does not hold model {model.config.name!r} "
                          f"(not in siclip's model: {missing[:3]}; not in the export: {left[:3]})")
    hf.load_state_dict({name: ours[name].detach().to(theirs[name].dtype) for name in theirs}, strict=True)
    return hf


def write_tokenizer(folder: Path, context_length: int, pad_token: str | None = None) -> None:
    """CLIP's tokenizer as transformers reads it: vocab.json and merges.txt from the shipped merge list."""
    from transformers import CLIPTokenizer

    from siclip.training.tokenizer import DEFAULT_VOCAB, N_MERGES, ClipTokenizer

    tok = ClipTokenizer()
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:N_MERGES + 1]
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    extra = {"pad_token": pad_token} if pad_token else {}
    CLIPTokenizer.from_pretrained(folder, model_max_length=context_length, **extra).save_pretrained(folder)


def write_image_processor(folder: Path, image_size: int, mean, std) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(mean), image_std=list(std), resample=3).save_pretrained(folder)


def write_remote_preprocessing(folder: Path, image_size: int, mean, std) -> None:
    """preprocessor_config.json naming hf_modeling's image processor and processor (siclip's centered square)."""
    config = {"image_processor_type": "SiCLIPImageProcessor", "processor_class": "SiCLIPProcessor",
              "auto_map": {"AutoImageProcessor": f"{MODULE}.SiCLIPImageProcessor",
                           "AutoProcessor": f"{MODULE}.SiCLIPProcessor"},
              "image_size": image_size, "image_mean": list(mean), "image_std": list(std)}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def needs_remote_code(cfg: SiCLIPConfig, remote_code: bool = False) -> bool:
    """Whether the model exports as the remote-code folder: asked for, or no CLIPModel holds it."""
    return remote_code or bool(clip_model_problems(cfg))


def export_model(model: SiCLIP, preprocess, folder: str | Path, remote_code: bool = False) -> Path:
    """Write the folder (weights, config, tokenizer, image processor) into `folder`: a CLIPModel where one holds
    the model, else (or with `remote_code`) the remote-code folder (module docstring)."""
    from siclip.teachers import quiet_transformers

    quiet_transformers()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    context = model.config.text.context_length
    if needs_remote_code(model.config, remote_code):
        to_remote_code(model).save_pretrained(folder)
        shutil.copyfile(TEMPLATE, folder / MODELING_FILE)
        write_tokenizer(folder, context, pad_token=PAD)
        write_remote_preprocessing(folder, preprocess.image_size, preprocess.mean, preprocess.std)
        return folder
    to_transformers(model).save_pretrained(folder)
    write_tokenizer(folder, context)
    write_image_processor(folder, preprocess.image_size, preprocess.mean, preprocess.std)
    return folder


def export_run(source: str | Path, out: str | Path | None = None, log=print,
               remote_code: bool = False) -> tuple[Path, bool]:
    """Export a run's final model (else its latest checkpoint) or a checkpoint folder: (out folder, written).
    `remote_code`: the remote-code folder even for a model that a CLIPModel holds.

    Inside a data root, `out` (default RUN/clip) is published and recorded in the train manifest after a
    budget check; outside one it is only written."""
    from siclip.manifests.layout import DataRoot
    from siclip.manifests.manifest import StageManifest
    from siclip.manifests.storage import StorageBudget, format_size
    from siclip.training.evaluate import load
    from siclip.training.model import CONFIG_FILE, load_config
    from siclip.teachers import STATE, find_checkpoint
    from siclip.training.runs import Run, folder_bytes

    checkpoint = find_checkpoint(source)
    if checkpoint is None:
        raise SiclipError(f"--run {source}: not a siclip run (no final/ or checkpoints/step-*/) nor a checkpoint folder")
    run_dir = Path(source) if checkpoint != Path(source) else checkpoint.parent
    out = Path(out) if out else run_dir / "clip"
    state = json.loads((checkpoint / STATE).read_text()) if (checkpoint / STATE).is_file() else {}
    root = _data_root_of(out.absolute())
    remote = needs_remote_code(load_config(checkpoint / CONFIG_FILE), remote_code)
    record = {"step": state.get("step"), "source": str(checkpoint.resolve()), "kind": EXPORT_KIND,
              **({"format": REMOTE_CODE} if remote else {})}
    if (out / STATE).is_file() and json.loads((out / STATE).read_text()) == record:
        if root is not None:
            data = DataRoot(root)
            manifest = StageManifest.load(data, "train")
            if not manifest.entry_ok(data, data.rel(out)):  # a kill between rename and record
                manifest.add(data, data.rel(out), sorted(p for p in out.rglob("*") if p.is_file()), samples=0,
                             kind=EXPORT_KIND, step=record["step"])
                manifest.save(data)
        log(f"export: {out} holds {checkpoint} already; skipped")
        return out, False

    model, _, preprocess = load(checkpoint)
    if root is None:
        export_model(model, preprocess, out, remote)
        (out / STATE).write_text(json.dumps(record, indent=1) + "\n")
        log(f"export: {checkpoint} -> {out}{_how(remote)} (outside any data root: not counted in a budget)")
        return out, True
    data = DataRoot(root)
    need = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + 4 * 2**20  # + tokenizer files
    budget = StorageBudget.load(data)
    old = folder_bytes(out) if out.is_dir() else 0
    if budget.budget_bytes and need > budget.remaining_bytes + old:
        raise SiclipError(f"export needs about {format_size(need)} but only {format_size(budget.remaining_bytes)} of "
                          f"the {format_size(budget.budget_bytes)} budget is left ('siclip manifest {root}')")
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():  # what a killed export left
        shutil.rmtree(data.inside(tmp))
    export_model(model, preprocess, tmp, remote)
    Run(data, run_dir.absolute()).publish(tmp, out.absolute(), record, kind=EXPORT_KIND)
    log(f"export: {checkpoint} -> {out}{_how(remote)} ({format_size(folder_bytes(out))}, recorded in "
        f"{data.manifest_path('train')})")
    return out, True


def _how(remote: bool) -> str:
    return ", remote code: load it with trust_remote_code=True" if remote else ", a transformers CLIPModel"


def _data_root_of(path: Path) -> Path | None:
    """The data root (a folder with manifests/shards.json) that holds `path`, if any."""
    for parent in [path, *path.parents]:
        if (parent / "manifests" / "shards.json").is_file():
            return parent
    return None
