""" --device-data: the augmentation on the device draws what timm's transforms draw (against timm's and
torchvision's own classes, on the same number of examples), batches are the loader's examples cut by index and
depend only on (seed, epoch, batch), a resumed run equals the uninterrupted one, and what it cannot honour is
one line before training.

The distribution tests compare two seeded samplers of the same law: with the seeds fixed they are deterministic
on any machine (torch's CPU generator and python's `random` are), and the thresholds (a two-sample
Kolmogorov-Smirnov p-value above 1e-3, a rate within 4 standard errors) hold for the same law with room, while a
wrong range (scale 0.08 against 0.2, log against linear aspect) fails them by orders of magnitude.
"""
import random
from types import SimpleNamespace

import numpy as np
import timm
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from timm_gmix.training.device_data import DeviceAugment, DeviceBatches, decode, seeded
from timm_gmix.training.errors import UsageError
from timm_gmix.training.loader import DeviceNormalize, EpochBatchSampler

from helpers import SMALL_RUN, assert_bad_input, read_summary, stopped_and_resumed, train_main

N = 4000


def augment_args(**overrides):
    args = dict(train_interpolation='random', scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, vflip=0.0,
                color_jitter=0.4, color_jitter_prob=None, aa=None, reprob=0.0, remode='pixel', recount=1,
                no_prefetcher=False, model_dtype=None, channels_last=False)
    return SimpleNamespace(**{**args, **overrides})


def data_config(size=32, channels=3):
    return {'input_size': (channels, size, size), 'interpolation': 'bicubic', 'mean': (0.5,) * channels,
            'std': (0.25,) * channels}


def drawn(augment, shape, seed=0):
    torch.manual_seed(seed)
    return augment.draw(shape)


def boxes(params):
    """ (top, left, height, width) per example from kornia's corner points. """
    src = params['crop']['src']
    left, top = src[:, 0, 0], src[:, 0, 1]
    return top, left, src[:, 2, 1] - top + 1, src[:, 2, 0] - left + 1


def timm_boxes(height, width, scale, ratio, seed=0):
    random.seed(seed)
    image = Image.new('RGB', (width, height))
    return torch.tensor([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(N)],
                        dtype=torch.float).T


def same_law(a, b):
    return ks_2samp(np.asarray(a), np.asarray(b)).pvalue > 1e-3


@pytest.mark.parametrize('height, width, scale, ratio', [(28, 28, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                         (24, 40, (0.5, 1.0), (0.5, 2.0)),
                                                         (8, 8, (0.08, 1.0), (3 / 4, 4 / 3))])
def test_crop_boxes_are_drawn_as_timms_random_resized_crop_draws_them(height, width, scale, ratio):
    """ Area fraction, aspect ratio and position of the crop (the fallback center crop included: 8x8 images
    often need it) against timm's RandomResizedCropAndInterpolation.get_params on as many images. """
    augment = DeviceAugment(augment_args(scale=list(scale), ratio=list(ratio)), data_config(), torch.device('cpu'))
    top, left, h, w = boxes(drawn(augment, (N, 3, height, width)))
    t_top, t_left, t_h, t_w = timm_boxes(height, width, scale, ratio)
    assert same_law(h * w / (height * width), t_h * t_w / (height * width))
    assert same_law((w / h).log(), (t_w / t_h).log())
    assert same_law(top / height, t_top / height) and same_law(left / width, t_left / width)
    assert bool((h >= 1).all() and (top + h <= height).all() and (left + w <= width).all())
    wrong = DeviceAugment(augment_args(scale=[min(scale[0] + 0.15, 0.9), 1.0], ratio=list(ratio)), data_config(),
                          torch.device('cpu'))
    _, _, h2, w2 = boxes(drawn(wrong, (N, 3, height, width)))
    assert not same_law(h2 * w2, t_h * t_w), 'the test cannot tell another scale apart'


def test_flips_and_interpolations_are_drawn_at_timms_rates():
    """ torchvision's RandomHorizontalFlip / RandomVerticalFlip (what timm's transform uses) flip each image
    with probability p; --train-interpolation random picks bilinear or bicubic per image, as timm's crop. """
    augment = DeviceAugment(augment_args(hflip=0.5, vflip=0.2), data_config(), torch.device('cpu'))
    params = drawn(augment, (N, 3, 8, 8))
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    torch.manual_seed(1)
    for name, p, flip in (('hflip', 0.5, transforms.RandomHorizontalFlip(0.5)),
                          ('vflip', 0.2, transforms.RandomVerticalFlip(0.2))):
        ours = float(params[name]['batch_prob'].float().mean())
        theirs = np.mean([flip(image) != image for _ in range(N)])
        bound = 4 * (p * (1 - p) / N) ** 0.5
        assert abs(ours - p) < bound and abs(theirs - p) < bound, (name, ours, theirs)
    assert abs(float(params['interpolation'].float().mean()) - 0.5) < 4 * (0.25 / N) ** 0.5
    assert DeviceAugment(augment_args(train_interpolation='bilinear'), data_config(),
                         torch.device('cpu')).interpolations == ('bilinear',)


def test_flips_mirror_each_resized_crop_as_torchvisions_flips_would():
    """ The flips are applied by mirroring each crop's sampling grid: exactly the resized crop, flipped where its
    draw says (checked against kornia's flip modules on the unflipped crops, both interpolations). """
    augment = DeviceAugment(augment_args(hflip=0.5, vflip=0.5, color_jitter=0.0), data_config(12), torch.device('cpu'))
    images = torch.randint(0, 256, (64, 3, 20, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    params = augment.draw(images.shape)
    assert 0 < params['hflip']['batch_prob'].sum() < 64 and 0 < params['vflip']['batch_prob'].sum() < 64
    unflipped = augment.apply(images, {k: v for k, v in params.items() if k not in ('hflip', 'vflip')})
    expected = augment.vflip(augment.hflip(unflipped, params=params['hflip']), params=params['vflip'])
    assert torch.equal(augment.apply(images, params), expected)


def test_color_jitter_factors_are_torchvisions():
    """ timm's --color-jitter 0.4 is torchvision's ColorJitter(0.4, 0.4, 0.4): factors per image, uniform in
    [0.6, 1.4]; --color-jitter-prob applies it to that share of the images; with --aa it is off, as in timm. """
    augment = DeviceAugment(augment_args(color_jitter=0.4), data_config(), torch.device('cpu'))
    params = drawn(augment, (N, 3, 8, 8))['jitter']
    torch.manual_seed(2)
    theirs = [transforms.ColorJitter.get_params(*((1 - 0.4, 1 + 0.4),) * 3, None) for _ in range(N)]
    for k, name in enumerate(('brightness_factor', 'contrast_factor', 'saturation_factor'), start=1):
        assert same_law(params[name], [t[k] for t in theirs]), name
    assert bool((params['hue_factor'] == 0).all())
    share = DeviceAugment(augment_args(color_jitter_prob=0.3), data_config(), torch.device('cpu'))
    applied = float(drawn(share, (N, 3, 8, 8))['jitter']['batch_prob'].float().mean())
    assert abs(applied - 0.3) < 4 * (0.21 / N) ** 0.5
    assert DeviceAugment(augment_args(aa='rand-m9'), data_config(), torch.device('cpu')).jitter is None


def test_an_identity_crop_is_the_prefetchers_normalized_batch():
    """ A crop of the whole image to its own size, no flip or jitter: the batch timm's prefetcher would feed,
    normalized as `DeviceNormalize` does (x - 255 mean, / 255 std), to float32 rounding. """
    args = augment_args(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, color_jitter=0.0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    out = DeviceAugment(args, data_config(16), torch.device('cpu'))(images)
    expected = DeviceNormalize(args, data_config(16), torch.device('cpu'), training=False)(images)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def device_batches(num_processes=1, process_index=0, skip=0, epoch=3):
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40)
    sampler = EpochBatchSampler(40, 4, seed=7, num_processes=num_processes)
    augment = DeviceAugment(augment_args(reprob=0.5), data_config(8, channels=1), torch.device('cpu'))
    batches = DeviceBatches(images, labels, sampler, augment, lambda x: x, 7, process_index, num_processes)
    sampler.plan(epoch, skip)
    return [(x.clone(), y.clone()) for x, y in batches]


def test_batches_are_the_samplers_examples_and_depend_only_on_seed_epoch_and_position():
    """ Each process cuts its share of the loader's batches (batch j of process r is the sampler's j * P + r);
    a batch is the same bit for bit when the epoch starts at it (a resume) and leaves the global RNGs alone. """
    sampler = EpochBatchSampler(40, 4, seed=7, num_processes=2)
    sampler.plan(3)
    expected = [[key[2] for key in keys] for keys in sampler]
    state = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    shares = [device_batches(2, r) for r in (0, 1)]
    assert torch.equal(torch.random.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    assert random.getstate() == state[2]
    assert [y.tolist() for j in range(len(shares[0])) for y in (shares[0][j][1], shares[1][j][1])] == expected
    whole, resumed = device_batches(), device_batches(skip=4)
    assert len(resumed) == len(whole) - 4
    for (x, y), (x2, y2) in zip(whole[4:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_epoch = device_batches(epoch=4)
    assert not torch.equal(whole[0][0], other_epoch[0][0])


def test_seeded_draws_are_the_same_for_the_same_entropy():
    with seeded(torch.device('cpu'), 1, 2, 3):
        a = torch.rand(3), random.random()
    with seeded(torch.device('cpu'), 1, 2, 3):
        b = torch.rand(3), random.random()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# ----------------------------------------------------------------------------------------------
# train.py


RUN = [*SMALL_RUN, '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg', '--device-data', '--epochs', '2',
       '--recovery-interval', '2', '--reprob', '0.25', '--model-ema']


def test_a_device_data_run_resumed_mid_epoch_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    whole, cut = stopped_and_resumed(RUN, tmp_path, monkeypatch)
    assert 'resumed from' in capsys.readouterr().out
    assert read_summary(cut) == read_summary(whole)
    for name in ('last/model.safetensors', 'model/model.safetensors'):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize('flags, expected', [
    (['--aa', 'rand-m9-mstd0.5'], ('--device-data cannot take --aa', 'drop one of them')),
    (['--aug-splits', '2', '--opt', 'sgd', '--mixup', '0', '--mixup-mode', 'batch'], ('--device-data cannot take --aug-splits',)),
    (['--no-prefetcher'], ('--device-data cannot take --no-prefetcher',)),
    (['--train-interpolation', 'lanczos'], ('--train-interpolation lanczos', 'bilinear, bicubic, nearest')),
])
def test_what_device_data_cannot_honour_is_one_line(flags, expected, capsys, tmp_path):
    assert_bad_input(capsys, tmp_path, [*SMALL_RUN, '--device-data', *flags], *expected)


def test_a_split_that_does_not_fit_or_differs_in_size_is_one_line(monkeypatch):
    class Images(torch.utils.data.Dataset):
        def __init__(self, sizes):
            self.sizes = sizes

        def __len__(self):
            return len(self.sizes)

        def __getitem__(self, i):
            return torch.zeros(3, *self.sizes[i], dtype=torch.uint8), 0

        def __getitems__(self, indices):
            return [self[i] for i in indices]

    images, labels = decode(Images([(4, 4)] * 3), torch.device('cpu'), 'training')
    assert images.shape == (3, 3, 4, 4) and labels.tolist() == [0, 0, 0]
    with pytest.raises(UsageError, match=r'must share one size: image 2 is \(3, 5, 4\), image 0 \(3, 4, 4\)'):
        decode(Images([(4, 4), (4, 4), (5, 4)]), torch.device('cpu'), 'training')
    monkeypatch.setattr('timm_gmix.training.device_data.free_memory', lambda device: 2 ** 30)
    with pytest.raises(UsageError, match=r'takes 0.56 GiB, more than 50% of the 1.00 GiB free on cpu'):
        decode(Images([(448, 448)] * 1000), torch.device('cpu'), 'training')


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    import datasets
    from helpers.image_data import make_image_folder, make_parquet_dataset, make_saved_dataset
    root = tmp_path_factory.mktemp('sources')
    with pytest.MonkeyPatch.context() as patch:  # `datasets` caches what it converts: not in the user's cache
        patch.setattr(datasets.config, 'HF_DATASETS_CACHE', root / 'hf_datasets_cache')
        yield {
            'folder': ['--data-dir', make_image_folder(root / 'images', val_folder='val')],
            'save_to_disk': ['--dataset', make_saved_dataset(root / 'saved')],
            'hfds_parquet': ['--dataset', f'hfds/{make_parquet_dataset(root / "parquet")}'],
            'digits': ['--dataset', 'digits'],
        }


@pytest.mark.parametrize('source', ['folder', 'save_to_disk', 'hfds_parquet', 'digits'])
def test_every_source_decodes_to_its_own_pixels_and_trains(source, sources, tmp_path):
    """ The decoded split is the images as PIL decodes them (uint8, C x H x W), labels in order; one epoch of
    DG-Mix trains on it. """
    from helpers import ROOT
    from timm_gmix.training.args import parse_args
    from timm_gmix.training.data import load_splits
    from timm_gmix.training.device_data import untransformed
    from timm_gmix.training.loader import with_transforms

    flags = [*sources[source], '--model', 'resnet10t', '--img-size', '16', '-b', '8', '--workers', '0',
             '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg', '--device-data', '--epochs', '1']
    args = parse_args([str(f) for f in flags], default_config=ROOT / 'configs' / 'digits.yaml')
    train_split, val_split, _ = load_splits(args)
    train_set, _, _ = with_transforms(train_split, val_split, args, timm.create_model('resnet10t', num_classes=3))
    images, labels = decode(untransformed(train_set), torch.device('cpu'), 'training')
    pil = untransformed(train_set)
    assert labels.tolist() == list(train_set.split[train_set.label_column])
    for i in range(0, len(images), max(1, len(images) // 16)):
        assert torch.equal(images[i], pil[i][0]), i
    train_main([*flags, '--output', tmp_path, '--experiment', 'run'])
    [row] = read_summary(tmp_path / 'run')
    assert row['train_skipped'] == '0' and float(row['eval_loss']) > 0


@pytest.mark.parametrize('box', [(1, 2, 5, 6), (0, 0, 8, 8), (3, 0, 4, 8)])
def test_a_crop_is_resized_as_pil_resizes_it(box):
    """ Upscaling a crop (no antialiasing involved) with bilinear interpolation gives PIL's resized_crop, which
    timm's RandomResizedCropAndInterpolation calls, to within one level of 255 (PIL's fixed-point weights and its
    uint8 result); the eval transform resizes with PIL too, so training and validation images share one geometry.
    kornia's crop_and_resize (corner pixel centers onto each other) is off by tens of levels here. """
    from torchvision.transforms import functional as TF
    from timm_gmix.training.device_data import crop_grid
    top, left, h, w = box
    pixels = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = TF.pil_to_tensor(TF.resized_crop(TF.to_pil_image(pixels), top, left, h, w, [32, 32],
                                                transforms.InterpolationMode.BILINEAR)).float()
    corners = torch.tensor([[[left, top], [left + w - 1, top], [left + w - 1, top + h - 1], [left, top + h - 1]]],
                           dtype=torch.float)
    out = torch.nn.functional.grid_sample(pixels[None].float(), crop_grid(corners, (8, 8), (32, 32)),
                                          mode='bilinear', padding_mode='border', align_corners=False)[0]
    assert (out - expected).abs().max() <= 1.0
