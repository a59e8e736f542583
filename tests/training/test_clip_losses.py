"""Each loss against its formula written out on small tensors, plus the behaviour it exists for."""

import math

import pytest
import torch
import torch.nn.functional as F

from siclip.training.losses import (
    ClipLoss,
    ContrastiveRelationDistillLoss,
    FeatureDistillLoss,
    InteractiveContrastiveLoss,
    PairMatchingLoss,
    gather_features,
)

N, D, D_T = 6, 8, 12


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def softmax_ce(row, target):
    """-log softmax(row)[target], by hand."""
    return -(row[target] - torch.log(sum(torch.exp(v) for v in row)))


@pytest.fixture
def batch():
    img, txt = unit(N, D, seed=0), unit(N, D, seed=1)
    return img.requires_grad_(), txt.requires_grad_(), torch.tensor(10.0), unit(N, D_T, seed=2), unit(N, D_T, seed=3)


def test_clip_loss_is_infonce_both_ways(batch):
    img, txt, scale, *_ = batch
    expected = sum(softmax_ce([scale * img[i] @ txt[j] for j in range(N)], i)
                   + softmax_ce([scale * txt[i] @ img[j] for j in range(N)], i) for i in range(N)) / (2 * N)
    assert torch.allclose(ClipLoss()(img, txt, scale), expected, atol=1e-5)


def pm_by_hand(img, txt, t, b, k):
    cos = img @ txt.T
    z = t * cos + b
    softplus = lambda v: math.log1p(math.exp(v))
    terms = []
    for S, Z in ((cos, z), (cos.T, z.T)):  # rows: image anchors; then columns: text anchors
        for a in range(N):
            others = sorted((j for j in range(N) if j != a), key=lambda j: -S[a, j].item())[:k]
            terms.append(softplus(-Z[a, a].item()) + sum(softplus(Z[a, j].item()) for j in others) / len(others))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("k", [1, 2, None])
def test_pair_matching_loss_is_bce_on_positives_and_the_k_hardest_negatives(batch, k):
    img, txt, *_ = batch
    loss = PairMatchingLoss(k=k, init_scale=5.0, init_bias=-2.0)
    expected = pm_by_hand(img.detach(), txt.detach(), 5.0, -2.0, N - 1 if k is None else k)
    assert math.isclose(loss(img, txt, None).item(), expected, rel_tol=1e-5)


def test_pair_matching_k_larger_than_the_batch_means_all_negatives(batch):
    img, txt, *_ = batch
    assert torch.allclose(PairMatchingLoss(k=100)(img, txt), PairMatchingLoss(k=None)(img, txt))


def test_pair_matching_separates_aligned_from_shuffled_pairs_and_trains_its_hyperplane():
    torch.manual_seed(0)
    img = unit(32, 16, seed=5)
    txt = F.normalize(img + 0.1 * torch.randn(32, 16), dim=-1).requires_grad_()  # aligned captions
    loss = PairMatchingLoss(k=4)
    aligned = loss(img, txt)
    shuffled = loss(img, txt[torch.randperm(32)])
    assert aligned < 0.5 * shuffled
    aligned.backward()
    assert txt.grad.isfinite().all() and txt.grad.abs().sum() > 0
    assert loss.log_scale.grad.isfinite() and loss.bias.grad.isfinite() and loss.bias.grad != 0


def test_pair_matching_rejects_nonpositive_k():
    with pytest.raises(ValueError):
        PairMatchingLoss(k=0)


def test_feature_distillation_is_mse_after_a_learned_projection(batch):
    img, txt, scale, t_img, t_txt = batch
    loss = FeatureDistillLoss(D, D_T)
    p_img = F.normalize(img @ loss.image_proj.weight.T, dim=-1)
    p_txt = F.normalize(txt @ loss.text_proj.weight.T, dim=-1)
    expected = (((p_img - t_img) ** 2).sum() + ((p_txt - t_txt) ** 2).sum()) / (2 * N * D_T)
    assert torch.allclose(loss(img, txt, scale, t_img, t_txt), expected, atol=1e-6)
    same_width = FeatureDistillLoss(D, D)
    assert same_width(img, txt, scale, img.detach(), txt.detach()).item() == pytest.approx(0, abs=1e-10)


def test_contrastive_relation_distillation_is_kl_both_ways_with_teacher_scale_100(batch):
    img, txt, scale, t_img, t_txt = batch

    def kl_rows(student, teacher):
        p_t, log_p_s = teacher.softmax(-1), student.log_softmax(-1)
        return (p_t * (p_t.log() - log_p_s)).sum() / len(student)

    s, t = scale * img @ txt.T, 100 * t_img @ t_txt.T
    expected = (kl_rows(s, t) + kl_rows(s.T, t.T)) / 2
    assert torch.allclose(ContrastiveRelationDistillLoss()(img, txt, scale, t_img, t_txt), expected, atol=1e-5)
    matched = ContrastiveRelationDistillLoss()(t_img, t_txt, torch.tensor(100.0), t_img, t_txt)
    assert matched.item() == pytest.approx(0, abs=1e-6)


def test_interactive_contrastive_loss_pairs_student_images_with_teacher_texts_and_the_reverse(batch):
    img, txt, scale, *_ = batch
    t_img, t_txt = unit(N, D, seed=7), unit(N, D, seed=8)
    expected = sum(softmax_ce([scale * img[i] @ t_txt[j] for j in range(N)], i)
                   + softmax_ce([scale * txt[i] @ t_img[j] for j in range(N)], i) for i in range(N)) / (2 * N)
    assert torch.allclose(InteractiveContrastiveLoss()(img, txt, scale, t_img, t_txt), expected, atol=1e-5)
    projected = InteractiveContrastiveLoss(D, D_T)
    assert isinstance(projected.image_proj, torch.nn.Linear)
    assert projected(img, txt, scale, *batch[3:]).isfinite()


ALL_TERMS = [ClipLoss(), PairMatchingLoss(k=2), FeatureDistillLoss(D, D_T), ContrastiveRelationDistillLoss(),
             InteractiveContrastiveLoss(D, D_T)]


@pytest.mark.parametrize("term", ALL_TERMS, ids=lambda t: type(t).__name__)
def test_every_term_has_the_same_call_shape_and_finite_gradients(batch, term):
    img, txt, _, t_img, t_txt = batch
    scale = torch.tensor(10.0, requires_grad=True)
    loss = term(img, txt, scale, teacher_image_features=t_img, teacher_text_features=t_txt)
    assert loss.dim() == 0 and loss.isfinite()
    loss.backward()
    assert img.grad.isfinite().all() and txt.grad.isfinite().all()
    assert img.grad.abs().sum() + txt.grad.abs().sum() > 0


@pytest.mark.parametrize("term", ALL_TERMS[2:], ids=lambda t: type(t).__name__)
def test_distillation_terms_demand_teacher_features(batch, term):
    img, txt, scale, *_ = batch
    with pytest.raises(ValueError, match="teacher"):
        term(img, txt, scale)


def test_gathering_is_the_identity_in_one_process(batch):
    img, txt, *_ = batch
    gathered = gather_features(img, txt, None)
    assert gathered[0] is img and gathered[1] is txt and gathered[2] is None
    assert torch.equal(ClipLoss(gather=True)(img, txt, torch.tensor(10.0)), ClipLoss()(img, txt, torch.tensor(10.0)))


@pytest.mark.parametrize("term", ALL_TERMS[2:], ids=lambda t: type(t).__name__)
def test_distillation_terms_read_teacher_features_at_unit_length(batch, term):
    """A two-teacher concatenation of unit vectors has length √2 (older sidecars): it must count as its direction."""
    img, txt, scale, t_img, t_txt = batch
    half = D_T // 2
    ensemble = lambda t: torch.cat([F.normalize(t[:, :half], dim=-1), F.normalize(t[:, half:], dim=-1)], dim=-1)
    long_img, long_txt = ensemble(t_img), ensemble(t_txt)
    assert torch.allclose(long_img.norm(dim=-1), torch.full((N,), math.sqrt(2)))
    unit_img, unit_txt = F.normalize(long_img, dim=-1), F.normalize(long_txt, dim=-1)
    assert torch.allclose(term(img, txt, scale, long_img, long_txt), term(img, txt, scale, unit_img, unit_txt),
                          atol=1e-6)
    # and the length does not leak in through any other scale
    assert torch.allclose(term(img, txt, scale, 3 * unit_img, 0.5 * unit_txt), term(img, txt, scale, unit_img, unit_txt),
                          atol=1e-6)
