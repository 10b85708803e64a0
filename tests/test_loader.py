""" Training batches depend only on (--seed, epoch, position): the same with any --workers, skippable
for an exact mid-epoch resume, and leaving the main process's RNG alone (but for random erasing on the device,
which draws from it as timm's prefetcher does); uint8 batches normalized on the device are the --no-prefetcher
batches. """
import random

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from helpers import SCRIPTS, accelerate_launch
from helpers.image_data import images_and_labels
from timm_gmix.training.args import build_parser
from timm_gmix.training.loader import EpochBatchSampler, SeededExamples, create_loaders, epoch_batches, \
    with_transforms

B = 4  # 24 training examples: 6 batches per pass
SKIP = 1  # loader_worker.SKIP


def loader_args(*argv):
    args = build_parser().parse_args(['--input-size', '3', '16', '16', '-b', str(B), '--reprob', '0.5', *argv])
    args.input_key, args.target_key = 'image', 'label'  # as load_splits resolves them
    return args


def split(name):
    rows = images_and_labels(name)
    return datasets.Dataset.from_dict({'image': [image for image, _, _ in rows], 'label': [y for _, y, _ in rows]})


def train_loader(*argv):
    args = loader_args(*argv)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=args.seed))
    train_set, val_set, data_config = with_transforms(split('train'), split('validation'), args, None)
    return create_loaders(train_set, val_set, args, accelerator, data_config)[0]


def epoch(loader, n, skip=0):
    """ The batches of epoch n from batch `skip`, the main process's RNG seeded first (random erasing on the
    device draws from it, as in training, where a resume restores it). """
    random.seed(n), torch.manual_seed(n)
    return [(x.clone(), y.clone()) for x, y in epoch_batches(loader, n, skip)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# random erasing on the device (timm's prefetcher) or in the workers
ERASING = {'on the device': (), 'in the workers': ('--no-prefetcher',)}


@pytest.mark.parametrize('erasing', sorted(ERASING))
def test_epochs_are_the_same_with_any_workers(erasing):
    in_main = train_loader('--workers', '0', *ERASING[erasing])
    in_workers = train_loader('--workers', '2', *ERASING[erasing])
    for n in (0, 1):
        assert_same_batches(epoch(in_main, n), epoch(in_workers, n))
    assert len(epoch(in_main, 0)) == 6


def test_each_epoch_draws_new_order_and_augmentation():
    loader = train_loader('--workers', '0')
    keys = []
    for n in (0, 1):
        loader.epoch_sampler.plan(n)
        keys.append([index for batch in loader.epoch_sampler for _, _, index in batch])
    assert keys[0] != keys[1] and sorted(keys[0]) == sorted(keys[1]) == list(range(24))
    # each example differently augmented: its image in epoch 0 against its image in epoch 1
    images = [torch.cat([x for x, _ in epoch(loader, n)])[torch.tensor(keys[n]).argsort()] for n in (0, 1)]
    assert all(not torch.equal(a, b) for a, b in zip(*images))


@pytest.mark.parametrize('argv', [('--reprob', '0'), ('--no-prefetcher',)], ids=['uint8', 'no-prefetcher'])
@pytest.mark.parametrize('persistent', ((), ('--use-multi-epochs-loader',)), ids=('fresh', 'persistent'))
def test_skipping_batches_leaves_the_rest_unchanged(persistent, argv):
    """ What the workers make (erasing included, with --no-prefetcher); erasing on the device draws from the main
    process's RNG, which a resumed run restores (tests/test_resume.py). """
    uninterrupted = epoch(train_loader('--workers', '2', *persistent, *argv), 1)
    resumed = train_loader('--workers', '2', *persistent, *argv)
    epoch(resumed, 0)  # workers that already served an epoch must see the new one
    assert_same_batches(epoch(resumed, 1, skip=2), uninterrupted[2:])
    assert epoch(resumed, 1, skip=6) == []


@pytest.mark.parametrize('argv', [('--reprob', '0'), ('--no-prefetcher',)], ids=['prefetcher', 'no-prefetcher'])
def test_iterating_leaves_the_main_process_rng_alone(argv):
    loader = train_loader('--workers', '0', *argv)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    [batch for batch in epoch_batches(loader, 3)]
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


@pytest.mark.parametrize('argv, batches', [((), 6), (('--epoch-repeats', '2.5'), 15),
                                           (('--train-batches-per-epoch', '4'), 4),
                                           (('--train-batches-per-epoch', '13'), 13)])
def test_epoch_length(argv, batches):
    loader = train_loader('--workers', '0', *argv)
    assert len(loader) == batches and len(epoch(loader, 0)) == batches


def test_each_pass_is_a_permutation():
    sampler = EpochBatchSampler(24, B, seed=0, epoch_repeats=2.5)
    sampler.plan(epoch=5)
    keys = [key for batch in sampler for key in batch]
    assert len(keys) == 60 and {key[0] for key in keys} == {5}
    for p in range(2):
        assert sorted(index for _, draw, index in keys if draw == p) == list(range(24))
    assert len({index for _, draw, index in keys if draw == 2}) == 12


def test_aug_repeats_go_to_different_processes():
    sampler = EpochBatchSampler(24, B, seed=0, num_processes=2, aug_repeats=3)
    sampler.plan(epoch=0)
    batches = list(sampler)
    assert len(batches) == 2 * 3  # 24 examples per epoch in all, 12 per process
    ranks = [[key for batch in batches[r::2] for key in batch] for r in range(2)]
    # the stream repeats each example 3 times in a row; its repeats alternate between the processes
    stream = [key for j in range(3) for pair in zip(batches[2 * j], batches[2 * j + 1]) for key in pair]
    assert [index for _, _, index in stream[:24:3]] == [index for _, _, index in stream[1:24:3]]
    assert [draw % 3 for _, draw, _ in stream[:6]] == [0, 1, 2, 0, 1, 2]
    assert set(ranks[0]).isdisjoint(ranks[1])


def test_aug_splits_batch_is_split_major():
    loader = train_loader('--workers', '0', '--aug-splits', '3', '--aa', 'augmix-m3-w2')
    sampler = loader.epoch_sampler
    sampler.plan(epoch=2)
    keys = next(iter(sampler))
    inputs, targets = next(iter(loader))  # as the workers make it: uint8, normalized and erased on the device
    assert inputs.shape == (3 * B, 3, 16, 16) and torch.equal(targets, targets[:B].repeat(3))
    examples = SeededExamples(loader.dataset.dataset, seed=42)
    for i, key in enumerate(keys):
        [(views, label)] = examples.__getitems__([key])
        assert targets[i] == label
        for j in range(3):
            assert torch.equal(inputs[j * B + i], views[j])
    assert not torch.equal(inputs[:B], inputs[B:2 * B])  # clean views, then augmented ones


def test_two_processes_resume_their_own_batches(tmp_path):
    proc = accelerate_launch(SCRIPTS / 'loader_worker.py', tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for rank in ranks:
        assert len(rank['whole']) == 3  # 24 examples, -b 4, two processes
        assert_same_batches(rank['resumed'], rank['whole'][SKIP:])
    labels = [torch.cat([y for _, y in rank['whole']]) for rank in ranks]
    assert sorted(torch.cat(labels).tolist()) == sorted(y for _, y, _ in images_and_labels('train'))


def test_uint8_batches_normalized_on_the_device_are_the_no_prefetcher_batches():
    """ timm's prefetcher: the workers make uint8 images, normalized (x - 255 mean) / (255 std) on the device;
    --no-prefetcher normalizes (x / 255 - mean) / std in the workers: the same batches up to float rounding. """
    prefetched, normalized = (epoch(train_loader('--workers', '0', '--reprob', '0', *argv), 0)
                              for argv in ((), ('--no-prefetcher',)))
    for (x, y), (x_ref, y_ref) in zip(prefetched, normalized):
        assert x.dtype == x_ref.dtype == torch.float32 and torch.equal(y, y_ref)
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)
    raw = next(iter(train_loader('--workers', '0')))[0]  # the loader itself, before the device
    assert raw.dtype == torch.uint8
