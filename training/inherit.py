"""Weight inheritance (METHOD §4): start a student SiCLIP from a pretrained teacher's tensors.

Every teacher is first rewritten into siclip's tensor names (`visual.blocks.3.attn.q.weight`,
...). Then each student tensor takes the teacher tensor of the same name:
- same shape: copied;
- smaller student (TinyCLIP-style): student layer i reads teacher layer i·⌊L_t/L_s⌋ and the
  first channels of each dimension: sliced. Attention projections are sliced per head (the
  first heads, and the first channels of each), so a student whose heads are narrower than
  the teacher's still gets whole teacher heads, not pieces of two; a student with more or
  wider heads than the teacher cannot, and starts fresh there. A ViT position table with a
  different patch grid is resized bicubically: interpolated;
- no counterpart, or a teacher tensor that does not fit: fresh (left as initialised). A teacher
  tensor of the right name that does not fit is also a warning (`report.warnings`).
SAS-P blocks are new modules, so they start fresh when the teacher's block at that depth
is a standard one; `sasp_from_teacher=True` seeds their norm, keys and MLP from it instead
(W_Q stays zero, so the block still starts as identity attention). The norm comes from `ln_2`
by default: the teacher's MLP, which the block uses from the first step, was trained on
`ln_2`'s output, while the keys matter only once W_Q has moved off zero.

Teachers: a `SiCLIP` or siclip checkpoint folder; a transformers `CLIPModel` or its hub name /
local folder; `"timm:fastvit_mci0.apple_mclip"` (MobileCLIP-S0's image tower) and
`"open_clip:ARCH/PRETRAINED"` or `"open_clip:FOLDER"` (siclip/teachers.py) with the extra
siclip[mobileclip] installed.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from siclip.teachers import TeacherSpec, load_teacher, parse_teacher
from siclip.training.model import SASPBlock, SiCLIP, SiCLIPConfig, config_from_dict

INHERITED = ("copied", "sliced", "interpolated")
_BLOCK = re.compile(r"^(visual|text)\.blocks\.(\d+)\.(.+)$")


@dataclass
class InheritedTensor:
    name: str
    how: str  # copied | sliced | interpolated | fresh
    source: str | None  # the teacher tensor it came from
    shape: list[int]
    source_shape: list[int] | None = None
    note: str = ""
    frozen: bool = False


@dataclass
class InheritanceReport:
    """One entry per student tensor (shared tensors under each of their names): its source and how."""

    teacher: str
    entries: list[InheritedTensor]
    frozen: bool = False
    warnings: list[str] = field(default_factory=list)  # teacher tensors that exist but could not be used

    def __getitem__(self, name: str) -> InheritedTensor:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.how for e in self.entries))

    def inherited_names(self) -> list[str]:
        return [e.name for e in self.entries if e.how in INHERITED]

    def frozen_names(self) -> list[str]:
        return [e.name for e in self.entries if e.frozen]

    def summary(self) -> str:
        counts = ", ".join(f"{n} {how}" for how, n in sorted(self.counts().items()))
        return (f"inherited from {self.teacher}: {counts} tensors"
                + (" (inherited ones frozen, new modules train)" if self.frozen else "")
                + (f"; {len(self.warnings)} warning(s): {self.warnings[0]}{' …' if len(self.warnings) > 1 else ''}"
                   if self.warnings else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "frozen": self.frozen, "counts": self.counts(), "warnings": self.warnings,
                "tensors": [asdict(e) for e in self.entries]}

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


# ----------------------------------------------------------------------------- teachers into siclip names

_HF_NAMES = [  # transformers CLIPModel -> siclip
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.pos_embed"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.blocks."),
    (r"^visual_projection\.", "visual.proj."),
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embed."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
    (r"^text_model\.final_layer_norm\.", "text.ln_final."),
    (r"^text_model\.encoder\.layers\.", "text.blocks."),
    (r"^text_projection\.", "text.proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.self_attn\.q_proj\.", ".attn.q."),
    (r"\.self_attn\.k_proj\.", ".attn.k."),
    (r"\.self_attn\.v_proj\.", ".attn.v."),
    (r"\.self_attn\.out_proj\.", ".attn.out."),
]


def siclip_name(name: str) -> str:
    """The siclip name of a transformers CLIPModel tensor (training.export runs it backwards)."""
    for pattern, replacement in _HF_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def from_transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in siclip names."""
    return {siclip_name(name): tensor for name, tensor in state.items() if not name.endswith("position_ids")}


def from_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP / CustomTextCLIP state dict in siclip names (fused qkv split, projections transposed)."""
    out = {}
    for name, tensor in state.items():
        name = re.sub(r"^text\.", "", name)  # CustomTextCLIP keeps its text tower under "text."
        name = re.sub(r"^transformer\.resblocks\.", "text.blocks.", name)
        name = re.sub(r"^visual\.transformer\.resblocks\.", "visual.blocks.", name)
        renames = {"token_embedding.weight": "text.token_embed.weight", "positional_embedding": "text.pos_embed",
                   "text_projection": "text.proj.weight", "visual.conv1.weight": "visual.patch_embed.weight",
                   "visual.class_embedding": "visual.cls_token", "visual.positional_embedding": "visual.pos_embed",
                   "visual.proj": "visual.proj.weight", "logit_scale": "logit_scale"}
        if name in renames:
            name = renames[name]
            if name.endswith("proj.weight"):
                tensor = tensor.T  # open_clip multiplies x @ proj; nn.Linear stores the transpose
        name = re.sub(r"^ln_final\.", "text.ln_final.", name)
        name = re.sub(r"\.mlp\.c_fc\.", ".mlp.fc1.", name)
        name = re.sub(r"\.mlp\.c_proj\.", ".mlp.fc2.", name)
        name = re.sub(r"\.attn\.out_proj\.", ".attn.out.", name)
        if re.search(r"\.attn\.in_proj_(weight|bias)$", name):
            kind = name.rsplit("_", 1)[1]
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                out[re.sub(r"in_proj_(weight|bias)$", f"{part}.{kind}", name)] = chunk
            continue
        out[name] = tensor
    return out


def config_from_transformers(clip_config, block: str = "preln") -> SiCLIPConfig:
    """The siclip config with a transformers CLIPConfig's own shape (pre-LN reproduces it exactly)."""
    v, t = clip_config.vision_config, clip_config.text_config
    eot = t.eos_token_id if t.eos_token_id != 2 else 49407  # 2 marks old configs that pool at the largest id
    return config_from_dict({
        "name": "from_transformers", "embed_dim": clip_config.projection_dim,
        "init_logit_scale": clip_config.logit_scale_init_value,
        "image": {"kind": "vit", "image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
                  "depth": v.num_hidden_layers, "heads": v.num_attention_heads,
                  "mlp_ratio": v.intermediate_size / v.hidden_size, "act": v.hidden_act, "block": block,
                  "ln_eps": v.layer_norm_eps},
        "text": {"vocab_size": t.vocab_size, "context_length": t.max_position_embeddings, "width": t.hidden_size,
                 "depth": t.num_hidden_layers, "heads": t.num_attention_heads,
                 "mlp_ratio": t.intermediate_size / t.hidden_size, "act": t.hidden_act, "block": block,
                 "ln_eps": t.layer_norm_eps, "causal": True, "eot_token_id": eot},
    })


def _siclip_heads(model: SiCLIP) -> dict[str, int | None]:
    return {"visual": model.config.image.heads, "text": model.config.text.heads}


def _transformers_heads(model) -> dict[str, int | None]:
    return {"visual": model.config.vision_config.num_attention_heads,
            "text": model.config.text_config.num_attention_heads}


def _open_clip_heads(model) -> dict[str, int | None]:
    def heads(tower):
        blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
        return getattr(blocks[0].attn, "num_heads", None) if blocks else None

    text = model.text if hasattr(model, "text") else model  # CustomTextCLIP keeps its tower under .text
    return {"visual": heads(getattr(model, "visual", None)), "text": heads(text)}


def _load_teacher(teacher) -> tuple[dict[str, torch.Tensor], str, dict[str, int | None]]:
    """(tensors in siclip names, description, attention heads per tower where known)."""
    if isinstance(teacher, SiCLIP):
        return teacher.state_dict(), f"siclip model {teacher.config.name!r}", _siclip_heads(teacher)
    if isinstance(teacher, nn.Module) and type(teacher).__name__ == "CLIPModel":  # transformers
        return (from_transformers_state(teacher.state_dict()), f"transformers CLIPModel {teacher.name_or_path or ''}",
                _transformers_heads(teacher))
    spec = teacher if isinstance(teacher, TeacherSpec) else parse_teacher(str(teacher), what="inherit_from")
    source = spec.source
    if spec.kind == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError("timm teachers need the extra: pip install 'siclip[mobileclip]'") from None
        model = timm.create_model(source[len("timm:"):], pretrained=True)
        return {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}, source, {"visual": None, "text": None}
    if spec.kind == "siclip":
        model = SiCLIP.from_pretrained(source)
        return model.state_dict(), f"siclip checkpoint {source}", _siclip_heads(model)
    model = load_teacher(spec, model_only=True, what="inherit_from").model
    if spec.kind == "open_clip":
        return from_open_clip_state(model.state_dict()), source, _open_clip_heads(model)
    if type(model).__name__ != "CLIPModel":
        raise ValueError(f"{spec.given!r} is a {type(model).__name__}; weights are inherited from a CLIPModel")
    return from_transformers_state(model.state_dict()), f"transformers CLIPModel {source}", _transformers_heads(model)


# ----------------------------------------------------------------------------- matching


def _depth(names, tower: str) -> int:
    layers = [int(m.group(2)) for m in map(_BLOCK.match, names) if m and m.group(1) == tower]
    return max(layers) + 1 if layers else 0


def _is_sasp(names, tower: str, layer: int) -> bool:
    return f"{tower}.blocks.{layer}.ln.weight" in names


# Where a SAS-P student block looks in a standard teacher block when sasp_from_teacher is set: its
# norm in one of SASP_NORMS (inherit_weights' sasp_norm), its keys and MLP in the same-named tensors.
SASP_NORMS = ("ln_1", "ln_2")
_SASP_FROM_PRELN = [(r"^attn\.k\.", "attn.k."), (r"^mlp\.", "mlp.")]
# Attention tensors whose axis holds heads × head width: outputs of q/k/v, inputs of the output projection.
_HEAD_AXIS = [(re.compile(r"\.attn\.(q|k|v)\.(weight|bias)$"), 0), (re.compile(r"\.attn\.out\.weight$"), 1)]


def _source_name(name: str, student_sasp: dict, student_depth: dict, teacher_names, teacher_depth: dict,
                 sasp_from_teacher: bool, sasp_norm: str) -> tuple[str | None, str, bool]:
    """(the teacher tensor a student tensor reads or None, a note, whether it belongs to a new module)."""
    m = _BLOCK.match(name)
    if not m:
        return name, "", False
    tower, i, rest = m.group(1), int(m.group(2)), m.group(3)
    L_s, L_t = student_depth[tower], teacher_depth[tower]
    j = i * max(1, L_t // L_s) if L_s else i
    if j >= L_t:
        return None, f"teacher has no layer {j}", student_sasp[tower][i]
    teacher_sasp = _is_sasp(teacher_names, tower, j)
    if student_sasp[tower][i] == teacher_sasp:
        return f"{tower}.blocks.{j}.{rest}", f"layer {i} <- teacher layer {j}" if i != j else "", False
    if student_sasp[tower][i] and sasp_from_teacher:
        for pattern, replacement in [(r"^ln\.", f"{sasp_norm}."), *_SASP_FROM_PRELN]:
            if re.match(pattern, rest):
                source = f"{tower}.blocks.{j}.{re.sub(pattern, replacement, rest)}"
                return source, f"SAS-P layer {i} <- standard layer {j}", True
    kind = "SAS-P block (new module)" if student_sasp[tower][i] else "standard block, teacher's is SAS-P"
    return None, kind, student_sasp[tower][i]


def _head_axis(name: str) -> int | None:
    return next((axis for pattern, axis in _HEAD_AXIS if pattern.search(name)), None)


def _slice_per_head(source: torch.Tensor, shape: torch.Size, axis: int, heads: tuple[int, int]
                    ) -> tuple[torch.Tensor | None, str]:
    """The first heads of `source` along `axis`, each cut to the student's head width; other axes front-sliced."""
    h_s, h_t = heads
    dh_s, dh_t = shape[axis] // h_s, source.shape[axis] // h_t
    if h_s > h_t or dh_s > dh_t:
        return None, f"the student's {h_s} heads of {dh_s} channels do not fit in the teacher's {h_t} of {dh_t}"
    split = source.unflatten(axis, (h_t, dh_t))
    cut = [slice(0, s) for s in shape]
    cut[axis:axis + 1] = [slice(0, h_s), slice(0, dh_s)]
    note = "" if dh_s == dh_t else f"per head: the first {dh_s} of {dh_t} channels of the first {h_s} heads"
    return split[tuple(cut)].flatten(axis, axis + 1), note


def _transfer(name: str, target: torch.Tensor, source: torch.Tensor,
              heads: tuple[int, int | None]) -> tuple[torch.Tensor | None, str, str]:
    """(the student's value from the teacher's tensor or None, how, a note on how or why not)."""
    axis = _head_axis(name)
    regrouped = axis is not None and None not in heads and heads[0] != heads[1]  # same channels, other heads
    if target.shape == source.shape and not regrouped:
        return source, "copied", ""
    if target.dim() != source.dim():
        return None, "fresh", "another number of dimensions"
    if name == "visual.pos_embed" and target.shape[0] != source.shape[0]:
        if target.shape[1] > source.shape[1]:
            return None, "fresh", "another patch grid and a wider student: nothing to interpolate from"
        return _resize_positions(source, target.shape[0])[:, : target.shape[1]], "interpolated", ""
    if target.dim() == 4 and target.shape[2:] != source.shape[2:]:
        return None, "fresh", "another kernel size (a kernel cannot be front-sliced)"
    if any(s > t for s, t in zip(target.shape, source.shape)):
        return None, "fresh", "the student's tensor is larger"
    if axis is not None and (regrouped or target.shape[axis] != source.shape[axis]):
        if heads[1] is None:
            return None, "fresh", "the teacher's head count is unknown, so its heads cannot be sliced"
        value, note = _slice_per_head(source, target.shape, axis, heads)
        return value, "sliced" if value is not None else "fresh", note
    return source[tuple(slice(0, s) for s in target.shape)], "sliced", ""


def _resize_positions(table: torch.Tensor, n_positions: int) -> torch.Tensor:
    """A [class + grid², width] position table resized to another square grid, bicubically."""
    cls, grid = table[:1], table[1:]
    side, new_side = int(round(grid.shape[0] ** 0.5)), int(round((n_positions - 1) ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1).to(table.dtype)])


@torch.no_grad()
def inherit_weights(student: SiCLIP, teacher, *, freeze: bool = False, sasp_from_teacher: bool = False,
                    sasp_norm: str = "ln_2", report_path: str | Path | None = None) -> InheritanceReport:
    """Copy or slice every student tensor that the teacher has (see module docstring); return the report.

    freeze=True stops gradients to the inherited tensors; new modules (SAS-P blocks, even when
    seeded by sasp_from_teacher) and logit_scale still train. sasp_norm: the teacher norm
    ("ln_1" or "ln_2") that seeds a SAS-P block's single norm.
    """
    if sasp_norm not in SASP_NORMS:
        raise ValueError(f"sasp_norm must be one of {SASP_NORMS}, got {sasp_norm!r}")
    teacher_state, description, teacher_heads = _load_teacher(teacher)
    student_heads = {"visual": student.config.image.heads, "text": student.config.text.heads}
    teacher_names = set(teacher_state)
    teacher_depth = {t: _depth(teacher_names, t) for t in ("visual", "text")}
    student_sasp = {t: [isinstance(b, SASPBlock) for b in getattr(getattr(student, t), "blocks", [])]
                    for t in ("visual", "text")}
    student_depth = {t: len(student_sasp[t]) for t in student_sasp}

    tensors = student.state_dict(keep_vars=True)
    owner: dict[int, str] = {}  # first name of each tensor; a shared attention appears under several names
    entries, done, problems = [], {}, []
    for name, tensor in tensors.items():
        key = id(tensor)
        if key in owner:
            first = done[owner[key]]
            entries.append(InheritedTensor(name, first.how, first.source, first.shape, first.source_shape,
                                           f"shares {owner[key]}", first.frozen))
            continue
        owner[key] = name
        source_name, note, new_module = _source_name(name, student_sasp, student_depth, teacher_names,
                                                     teacher_depth, sasp_from_teacher, sasp_norm)
        entry = InheritedTensor(name, "fresh", None, list(tensor.shape), note=note)
        if source_name is not None and source_name in teacher_state:
            source = teacher_state[source_name]
            tower = name.split(".", 1)[0]
            value, how, why = _transfer(name, tensor, source, (student_heads.get(tower), teacher_heads.get(tower)))
            entry.source_shape = list(source.shape)
            if value is not None:
                tensor.copy_(value.to(tensor.dtype))
                entry.how, entry.source = how, source_name
                entry.note = "; ".join(n for n in (note, why) if n)
            else:
                entry.note = f"teacher's {source_name} {list(source.shape)} does not fit: {why}; starts fresh"
                problems.append(f"{name}: {entry.note}")
        elif source_name is not None:
            entry.note = "no teacher tensor of this name"
        # New modules train even when seeded from the teacher (METHOD §4); so does the temperature.
        if freeze and entry.how in INHERITED and not new_module and name != "logit_scale" \
                and isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(False)
            entry.frozen = True
        done[name] = entry
        entries.append(entry)

    report = InheritanceReport(description, entries, frozen=freeze, warnings=problems)
    if problems:
        warnings.warn(f"weight inheritance: {len(problems)} student tensor(s) start fresh although the teacher "
                      f"has them, first {problems[0]}", stacklevel=3)  # past the no_grad wrapper
    if report_path is not None:
        report.save(report_path)
    return report
