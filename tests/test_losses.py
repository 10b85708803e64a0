""" The per-example losses average to timm's own losses, and create_loss picks what timm's train.py picks. """
import argparse

import pytest
import torch
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy

from timm_gmix.step import cross_entropy_per_example
from timm_gmix.training.losses import binary_cross_entropy_per_example, create_loss, jsd_cross_entropy_per_example

N, C = 12, 5


def batch(soft: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, C, generator=g) * 3
    if soft:  # a mixed target: two smoothed one-hots mixed
        target = torch.softmax(torch.randn(N, C, generator=g) * 2, dim=1)
    else:
        target = torch.randint(0, C, (N,), generator=g)
    return logits, target


@pytest.mark.parametrize('soft', (False, True), ids=('index', 'soft'))
@pytest.mark.parametrize('options', (
        dict(smoothing=0.1), dict(smoothing=0.0), dict(smoothing=0.2, target_threshold=0.2),
        dict(smoothing=0.1, sum_classes=True), dict(smoothing=0.1, pos_weight=2.5),
        dict(smoothing=0.3, target_threshold=0.1, sum_classes=True, pos_weight=0.5)))
def test_bce_per_example_means_to_timm(soft, options):
    logits, target = batch(soft)
    per_example = binary_cross_entropy_per_example(logits, target, num_classes=C, **options)
    assert per_example.shape == (N,)
    torch.testing.assert_close(per_example.mean(), BinaryCrossEntropy(**options)(logits, target), rtol=0, atol=1e-6)


@pytest.mark.parametrize('num_splits', (2, 3))
@pytest.mark.parametrize('smoothing', (0.0, 0.1))
def test_jsd_per_example_means_to_timm(num_splits, smoothing):
    logits = torch.randn(num_splits * 4, C, generator=torch.Generator().manual_seed(1)) * 3
    target = torch.randint(0, C, (4,), generator=torch.Generator().manual_seed(2)).repeat(num_splits)
    per_row = jsd_cross_entropy_per_example(logits, target, num_splits, smoothing=smoothing)
    assert per_row.shape == (num_splits * 4,)
    assert torch.equal(per_row, per_row[:4].repeat(num_splits))  # each example's loss on each of its views
    expected = JsdCrossEntropy(num_splits=num_splits, smoothing=smoothing)(logits, target)
    torch.testing.assert_close(per_row.mean(), expected, rtol=0, atol=1e-6)


def test_jsd_rejects_uneven_splits():
    with pytest.raises(ValueError, match='not 3 equal augmentation splits'):
        jsd_cross_entropy_per_example(torch.zeros(8, C), torch.zeros(8, dtype=torch.long), 3)


def loss_args(**overrides):
    defaults = dict(jsd_loss=False, bce_loss=False, aug_splits=0, smoothing=0.1, bce_target_thresh=None,
                    bce_sum=False, bce_pos_weight=None)
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.mark.parametrize('soft', (False, True), ids=('index', 'soft'))
def test_create_loss_chooses_as_timm(soft):
    logits, target = batch(soft)
    ce = create_loss(loss_args(), C)(logits, target)
    assert torch.equal(ce, cross_entropy_per_example(logits, target, 0.1))
    bce = create_loss(loss_args(bce_loss=True, bce_sum=True, bce_pos_weight=2.0), C)(logits, target)
    timm_bce = BinaryCrossEntropy(smoothing=0.1, sum_classes=True, pos_weight=2.0)(logits, target)
    torch.testing.assert_close(bce.mean(), timm_bce, rtol=0, atol=1e-6)
    if not soft:
        jsd = create_loss(loss_args(jsd_loss=True, aug_splits=3), C)(logits, target[:4].repeat(3))
        timm_jsd = JsdCrossEntropy(num_splits=3, smoothing=0.1)(logits, target[:4].repeat(3))
        torch.testing.assert_close(jsd.mean(), timm_jsd, rtol=0, atol=1e-6)
