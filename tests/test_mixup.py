""" GMixup against timm's Mixup, the pairing and lam it reports, argument checks, and the descent
batch of BG-Mix / DG-Mix. """
import re

import numpy as np
import pytest
import torch
from timm.data import Mixup

from timm_gmix import GMixup, MixedBatch, flag_examples, num_flagged

B = 8
ALPHAS = {
    'mixup': dict(mixup_alpha=1.0, cutmix_alpha=0.0),
    'cutmix': dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    'both': dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    'minmax': dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
}


def images(batch_size=B, seed=0, size=16):
    """ Random images: every value distinct, so each mixed pixel tells where it came from. """
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, size, size, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def seeded(fn, seed, *args):
    np.random.seed(seed)
    return fn(*args)


def one_hot(y, smoothing=0.0, num_classes=10):
    t = torch.full((len(y), num_classes), smoothing / num_classes)
    t[torch.arange(len(y)), y] += 1.0 - smoothing
    return t


def partner_mask(mixed, x):
    """ For CutMix: per example, the (H, W) mask of pixels copied from the partner B-1-i. Checks that
    every other pixel is the example's own and that the copied pixels form one box. """
    masks = []
    for i in range(len(x)):
        own = (mixed[i] == x[i]).all(0)
        theirs = (mixed[i] == x[len(x) - 1 - i]).all(0)
        assert (own ^ theirs).all(), f'example {i}: a pixel is neither its own nor its partner\'s'
        if theirs.any():
            rows, cols = theirs.any(1).nonzero().squeeze(1), theirs.any(0).nonzero().squeeze(1)
            box = theirs[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all() and box.numel() == theirs.sum(), f'example {i}: not a box'
        masks.append(theirs)
    return torch.stack(masks)


# ----------------------------------------------------------------------------------------------
# Same as timm


@pytest.mark.parametrize('alphas', ALPHAS, ids=str)
@pytest.mark.parametrize('lam_mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('gmix', [None, 'g', 'bg', 'dg'])
@pytest.mark.parametrize('prob', [1.0, 0.6])
def test_mixes_exactly_like_timm(alphas, lam_mode, gmix, prob):
    """ GMixup(mode=m) and GMixup(mode=g/bg/dg, lam_mode=m) give timm's Mixup(mode=m) x and target,
    called as timm's and through `mix()`. """
    kwargs = dict(ALPHAS[alphas], prob=prob, label_smoothing=0.1, num_classes=10)
    gmixup = GMixup(mode=gmix, lam_mode=lam_mode, **kwargs) if gmix else GMixup(mode=lam_mode, **kwargs)
    x, y = images()
    for seed in range(4):
        x_timm, t_timm = seeded(Mixup(mode=lam_mode, **kwargs), seed, x.clone(), y)
        x_call, t_call = seeded(gmixup, seed, x.clone(), y)
        batch = seeded(gmixup.mix, seed, x.clone(), y)
        for got_x, got_t in ((x_call, t_call), (batch.inputs, batch.targets)):
            assert torch.equal(got_x, x_timm) and torch.equal(got_t, t_timm)
        assert torch.equal(batch.labels, y)


def test_mix_keeps_multi_label_targets():
    """ GMixup takes timm's arguments; `mix()` (used by gmix_step) must honour multi_label too. """
    kwargs = dict(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10, multi_label=True)
    x, _ = images()
    dense = (torch.rand(B, 10, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    _, t_timm = seeded(Mixup(**kwargs), 0, x.clone(), dense)
    batch = seeded(GMixup(mode='g', **kwargs).mix, 0, x.clone(), dense)
    assert torch.equal(batch.targets, t_timm)


# ----------------------------------------------------------------------------------------------
# What mix() reports: lam, partner, clean batch


@pytest.mark.parametrize('lam_mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('gmix', ['g', 'bg', 'dg'])
def test_mix_reports_lam_like_timm(lam_mode, gmix):
    """ With distinct labels and no smoothing, timm's target holds lam_i at y_i. """
    kwargs = dict(ALPHAS['both'], label_smoothing=0.0, num_classes=10)
    x, _ = images()
    y = torch.arange(B)
    _, t_timm = seeded(Mixup(mode=lam_mode, **kwargs), 3, x.clone(), y)
    batch = seeded(GMixup(mode=gmix, lam_mode=lam_mode, **kwargs).mix, 3, x.clone(), y)
    assert batch.lam.shape == (B,)
    torch.testing.assert_close(batch.lam, t_timm[torch.arange(B), y], rtol=0, atol=1e-6)
    assert torch.equal(batch.partner, torch.arange(B - 1, -1, -1))


@pytest.mark.parametrize('lam_mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('alphas', ['mixup', 'cutmix', 'minmax'])
@pytest.mark.parametrize('gmix', ['g', 'bg', 'dg'])
def test_mix_lam_recomputed_from_the_images(lam_mode, alphas, gmix):
    """ lam_i is the share of x_i in the mixed image: 1 - the area copied from B-1-i for CutMix
    (area-corrected), the blending weight for Mixup; the target is lam_i y_i + (1 - lam_i) y_p(i). """
    x, y = images()
    gmixup = GMixup(mode=gmix, lam_mode=lam_mode, label_smoothing=0.1, num_classes=10, **ALPHAS[alphas])
    batch = seeded(gmixup.mix, 5, x.clone(), y)
    partner = torch.arange(B - 1, -1, -1)
    if alphas == 'mixup':
        lam = batch.lam.double().view(B, 1, 1, 1)
        torch.testing.assert_close(batch.inputs, (lam * x + (1 - lam) * x[partner]).float(), rtol=0, atol=1e-6)
        assert (batch.lam < 1).all()
    else:
        copied = partner_mask(batch.inputs, x)
        expected_lam = 1 - copied.float().mean((1, 2))
        torch.testing.assert_close(batch.lam, expected_lam, rtol=0, atol=1e-6)
        assert (expected_lam < 1).any()
    lam = batch.lam.view(B, 1)
    expected_target = lam * one_hot(y, 0.1) + (1 - lam) * one_hot(y[partner], 0.1)
    torch.testing.assert_close(batch.targets, expected_target, rtol=0, atol=1e-6)
    if gmix == 'g':
        assert batch.clean_inputs is None
    else:
        assert torch.equal(batch.clean_inputs, x)
        torch.testing.assert_close(batch.clean_targets, one_hot(y, 0.1), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Argument checks


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError) as err:
        GMixup(mode='foo')
    words = set(re.findall(r'\w+', str(err.value)))
    assert {'foo', 'batch', 'pair', 'elem', 'g', 'bg', 'dg'} <= words


@pytest.mark.parametrize('kwargs', [
    dict(lam_mode='foo'), dict(lam_mode='g'), dict(gmix_flag='foo'),
    dict(gmix_ratio=-0.01), dict(gmix_ratio=1.01), dict(gmix_ratio=float('nan')),
], ids=str)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        GMixup(mode='dg', **kwargs)


@pytest.mark.parametrize('ratio', [0.0, 1.0])
def test_ratio_bounds_are_allowed(ratio):
    assert GMixup(mode='bg', gmix_ratio=ratio).gmix_ratio == ratio


@pytest.mark.parametrize('mode', ['batch', 'elem', 'g', 'dg'])
def test_odd_batch_raises(mode):
    x, y = images(7)
    with pytest.raises(ValueError, match='even'):
        GMixup(mode=mode).mix(x, y)


# ----------------------------------------------------------------------------------------------
# The descent batch of BG-Mix / DG-Mix

LAM = torch.tensor([0.9, 0.7, 1.0, 0.2, 0.4, 0.8])


def hand_made_batch(lam=LAM):
    """ A MixedBatch built by hand: every mixed and clean input distinct. """
    n = len(lam)
    g = torch.Generator().manual_seed(0)
    clean, mixed = torch.rand(n, 3, 2, 2, generator=g), torch.rand(n, 3, 2, 2, generator=g) + 2
    y = torch.tensor([3, 1, 4, 1, 5, 9])[:n]
    partner = torch.arange(n - 1, -1, -1)
    lam_ = lam.view(n, 1)
    targets = lam_ * one_hot(y, 0.1) + (1 - lam_) * one_hot(y[partner], 0.1)
    return MixedBatch(mixed, targets, y, lam.clone(), clean, one_hot(y, 0.1))


def identify(batch, inputs, targets, weights):
    """ {('mixed', i) or ('clean', i): weight} for the rows of a descent batch, in row order; checks each row's
    target and that no example appears twice. """
    found = {}
    for row, target, weight in zip(inputs, targets, weights):
        matches = [(kind, i) for kind, source in (('mixed', batch.inputs), ('clean', batch.clean_inputs))
                   for i in range(len(source)) if torch.equal(row, source[i])]
        assert len(matches) == 1, 'a descent row is not exactly one mixed or clean example'
        (kind, i), = matches
        assert (kind, i) not in found, f'{kind} example {i} appears twice'
        source_targets = batch.targets if kind == 'mixed' else batch.clean_targets
        assert torch.equal(target, source_targets[i])
        found[(kind, i)] = float(weight)
    return found


def textbook_weights(lam, flagged, mode):
    """ bg: flagged i -> clean x_i with weight 1. dg: flagged i -> clean x_i with lam_i and clean
    x_{B-1-i} with 1 - lam_i, summed. Unflagged i -> mixed i with weight 1. """
    n, weights = len(lam), {}
    for i in range(n):
        if not flagged[i]:
            weights[('mixed', i)] = 1.0
            continue
        shares = [(i, 1.0)] if mode == 'bg' else [(i, float(lam[i])), (n - 1 - i, 1 - float(lam[i]))]
        for j, share in shares:
            weights[('clean', j)] = weights.get(('clean', j), 0.0) + share
    return {k: w for k, w in weights.items() if w > 0}


def mask(indices, n=len(LAM)):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(indices)] = True
    return m


@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_descent_batch_nothing_flagged_is_the_mixed_batch(mode):
    batch = hand_made_batch()
    inputs, targets, weights = batch.descent_batch(mask([]), mode)
    assert torch.equal(inputs, batch.inputs) and torch.equal(targets, batch.targets)
    assert torch.equal(weights, torch.ones(len(LAM)))


@pytest.mark.parametrize('flagged', [[1], [0, 3], [1, 4], [2], [0, 1, 4, 5], list(range(6))], ids=str)
@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_descent_batch_weights(mode, flagged):
    """ [1, 4] and [0, 1, 4, 5] flag both members of a pair (a clean example needed twice);
    [2] flags lam = 1 (its partner then has no share). """
    batch = hand_made_batch()
    found = identify(batch, *batch.descent_batch(mask(flagged), mode))
    expected = textbook_weights(LAM, mask(flagged), mode)
    assert found.keys() == expected.keys()
    for key, weight in expected.items():
        assert found[key] == pytest.approx(weight, abs=1e-6), key
    assert sum(found.values()) == pytest.approx(len(LAM), abs=1e-5)


@pytest.mark.parametrize('batch_size, gamma', [(16, 0.5), (64, 0.5), (64, 0.25), (32, 0.1)])
@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_descent_batch_is_its_rows_and_no_other_in_example_order(mode, batch_size, gamma):
    """ No row is added (a padding row would count in BatchNorm's batch statistics): a bg batch has B rows, a dg
    batch exactly its B - F mixed and F..2F clean rows; rows stand by the example they come from, the mixed row
    of i before the clean x_i, so micro-batches hold mixed and clean rows of their own part of the batch. """
    sizes = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(batch_size, 3, 4, 4, generator=g), torch.randint(0, 10, (batch_size,), generator=g)
        batch = seeded(GMixup(mode=mode, gmix_ratio=gamma, label_smoothing=0.1, num_classes=10).mix, seed, x, y)
        flagged = flag_examples(torch.rand(batch_size, generator=g), gamma)
        inputs, targets, weights = batch.descent_batch(flagged, mode)
        found = identify(batch, inputs, targets, weights)
        assert len(inputs) == len(targets) == len(weights) == len(found) == \
            len(textbook_weights(batch.lam, flagged, mode))
        assert list(found) == sorted(found, key=lambda key: (key[1], key[0] == 'clean'))
        sizes.add(len(inputs))
    assert sizes == {batch_size} if mode == 'bg' else len(sizes) > 1


def test_descent_batch_dg_with_cutmix_uses_the_area_lam():
    x, y = images()
    gmixup = GMixup(mode='dg', lam_mode='elem', label_smoothing=0.1, num_classes=10, **ALPHAS['cutmix'])
    batch = seeded(gmixup.mix, 11, x.clone(), y)
    area_lam = 1 - partner_mask(batch.inputs, x).float().mean((1, 2))
    flagged = mask([0, 2, 5, 6], n=B)  # 2 and 5 are a pair: both clean examples needed twice
    found = identify(batch, *batch.descent_batch(flagged, 'dg'))
    expected = textbook_weights(area_lam, flagged, 'dg')
    assert found.keys() == expected.keys()
    for key, weight in expected.items():
        assert found[key] == pytest.approx(weight, abs=1e-6), key
