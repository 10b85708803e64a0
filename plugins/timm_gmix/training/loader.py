""" Training and validation loaders whose batches depend only on (--seed, epoch, batch position), fed as timm
feeds them.

The training loader's batch sampler decides every example of an epoch in the main process from (seed, epoch);
each example is fetched by a key (epoch, draw, index), and the dataset seeds python's `random`, numpy and torch
from (seed, epoch, draw, index) before running its augmentation; the process's RNG states are put back after
each batch. So an epoch's batches are the same bit for bit with any --workers (persistent or not), batch k of
an epoch can be made without making batches 0..k-1 (exact mid-epoch resume), an example is augmented alike
whichever batch holds it (-b 8 --grad-accum-steps 2 trains on the batches of -b 16), and iterating with
--workers 0 leaves the main process's RNG (Mixup, dropout) untouched.

As in timm, the workers make uint8 batches (timm's prefetcher transforms and `fast_collate`), which go to the
device as they are (pinned and copied without blocking with --pin-mem) and are normalized, random-erased and
laid out there (`DeviceNormalize`); `--no-prefetcher` normalizes (and random-erases) in the workers instead.
"""
import itertools
import random
from contextlib import contextmanager

import numpy as np
import torch
from timm.data import AugMixDataset, create_transform, resolve_data_config
from timm.data.loader import fast_collate
from timm.data.random_erasing import RandomErasing

from .data import ImageClassification
from .errors import UsageError


def with_transforms(train_split, val_split, args, model):
    """ (train_set, val_set, data_config): torch datasets applying timm's train transform (all of timm's
    augmentation flags, as timm's create_loader passes them) and eval transform for `model`, in timm's prefetcher
    form (uint8, normalized on the device) unless --no-prefetcher. With --aug-splits K the train set gives K
    views per example as timm's AugMixDataset does. """
    data_config = resolve_data_config(vars(args), model=model)
    in_chans = data_config['input_size'][0]
    for key in ('mean', 'std'):  # a model made for a different number of channels (e.g. --in-chans 1)
        if len(data_config[key]) != in_chans:
            data_config[key] = (float(np.mean(data_config[key])),) * in_chans
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    prefetcher = not args.no_prefetcher
    train_tf = create_transform(
        data_config['input_size'], is_training=True, use_prefetcher=prefetcher, no_aug=args.no_aug,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, interpolation=train_interpolation,
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_num_splits=re_num_splits(args), separate=args.aug_splits > 0)
    eval_tf = create_transform(**data_config, is_training=False, use_prefetcher=prefetcher)
    columns = dict(image_column=args.input_key, label_column=args.target_key, in_chans=in_chans,
                   img_mode=args.input_img_mode, skip_bad_images=args.skip_bad_images)
    train_set = ImageClassification(train_split, train_tf, **columns)
    if args.aug_splits > 0:
        train_set = AugMixDataset(train_set, num_splits=args.aug_splits)
    return train_set, ImageClassification(val_split, eval_tf, **columns), data_config


def re_num_splits(args) -> int:
    """ timm's: random erasing leaves the clean split alone with --resplit. """
    return (args.aug_splits or 2) if args.resplit else 0


class DeviceNormalize:
    """ timm's prefetcher, on the device: a uint8 batch becomes float, normalized with the data's mean and std (as
    timm does it: x - 255 mean, / 255 std), random-erased for training (--reprob, drawing from the main process's
    RNG as timm's does); then any batch gets the model's dtype and --channels-last layout. With --no-prefetcher
    the batch comes normalized and erased from the workers and only the last step applies. """

    def __init__(self, args, data_config, device, training: bool, normalize=None):
        """ `normalize`: False for batches normalized already (--device-data's); default: unless --no-prefetcher. """
        self.normalize = not args.no_prefetcher if normalize is None else normalize
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor([255 * m for m in data_config['mean']], device=device).view(shape)
        self.std = torch.tensor([255 * s for s in data_config['std']], device=device).view(shape)
        self.erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount,
                                   num_splits=re_num_splits(args), device=device) \
            if training and self.normalize and args.reprob > 0 else None
        self.dtype = getattr(torch, args.model_dtype or 'float32')
        self.layout = torch.channels_last if args.channels_last else torch.preserve_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = x.float().sub_(self.mean).div_(self.std)
            if self.erase is not None:
                x = self.erase(x)
        return x.to(dtype=self.dtype, memory_format=self.layout)


@contextmanager
def restored_rngs():
    """ python `random`, numpy and torch's CPU generator back in their states after the block. """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def seed_rngs(*entropy: int):
    """ python `random`, numpy and torch's CPU generator seeded from `entropy`. """
    words = np.random.SeedSequence(list(entropy)).generate_state(4)
    random.seed(int(words[0]))
    np.random.seed(words[1])
    torch.random.default_generator.manual_seed(int(words[2]) << 32 | int(words[3]))


class SeededExamples(torch.utils.data.Dataset):
    """ The examples for keys (epoch, draw, index), each augmented from RNGs seeded from (seed, epoch, draw,
    index) alone; `draw` tells apart the copies of an example in one epoch (--epoch-repeats passes, --aug-repeats
    repeats). A loader fetches a batch of keys in one call (`__getitems__`): the data is read once for the
    batch, and the process's RNG states are saved and put back once. """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        def seed(i):
            seed_rngs(self.seed, *keys[i])

        with restored_rngs():
            if isinstance(self.dataset, ImageClassification):
                return self.dataset.__getitems__([index for _, _, index in keys], before=seed)
            examples = []
            for i, (_, _, index) in enumerate(keys):
                seed(i)
                examples.append(self.dataset[index])
            return examples


class EpochBatchSampler:
    """ The training batches of all processes for one epoch: batch j of process r is item j * P + r (P
    processes), the order in which Accelerate's BatchSamplerShard hands batches out, so that preparing the
    loader gives each process its own batches; each batch is a list of keys (epoch, draw, index). Each epoch
    draws fresh permutations of the data from (seed, epoch); each example is repeated `aug_repeats` times in a
    row, the repeats going to different processes (timm's RepeatAugSampler). An epoch has `num_batches` batches
    per process, else round(max(epoch_repeats, 1) * examples) / P examples per process in full batches.
    Call `plan(epoch, skip)` before iterating; `skip` batches per process are left out, the others unchanged. """
    drop_last = True

    def __init__(self, num_examples: int, batch_size: int, seed: int, num_processes: int = 1,
                 epoch_repeats: float = 0., num_batches=None, aug_repeats: int = 0):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.repeats = max(int(aug_repeats), 1)
        examples = round(epoch_repeats * num_examples) if epoch_repeats > 0 else num_examples
        self.batches_per_process = num_batches or examples // num_processes // batch_size
        self.epoch, self.skip = 0, 0

    def plan(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.batches_per_process * self.num_processes

    def _keys(self):
        """ (epoch, draw, index) for ever: successive permutations, each index `repeats` times. """
        seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        for p in itertools.count():
            for index in torch.randperm(self.num_examples, generator=generator).tolist():
                for a in range(self.repeats):
                    yield self.epoch, p * self.repeats + a, index

    def __iter__(self):
        per_batch = self.batch_size * self.num_processes
        keys = list(itertools.islice(self._keys(), self.batches_per_process * per_batch))
        for j in range(self.skip, self.batches_per_process):
            rows = keys[j * per_batch:(j + 1) * per_batch]
            for r in range(self.num_processes):
                yield rows[r::self.num_processes]


def collate_views(batch):
    """ (images, targets) from float images; K views per example (AugMix splits) become one batch of K * B
    images, split-major (view j of all examples is block j) with the targets repeated, as timm's fast_collate
    lays out the uint8 ones. """
    views = [x if isinstance(x, tuple) else (x,) for x, _ in batch]
    images = torch.cat([torch.stack([v[j] for v in views]) for j in range(len(views[0]))])
    targets = torch.tensor([y for _, y in batch], dtype=torch.long).repeat(len(views[0]))
    return images, targets


def create_loaders(train_set, val_set, args, accelerator, data_config):
    """ (train_loader, val_loader), prepared by `accelerator`: -b per process, --workers, --pin-mem (then copied
    to the device without blocking), workers kept between epochs (as timm's loader); the training loader drops
    the last partial batch and follows EpochBatchSampler (--epoch-repeats, --train-batches-per-epoch,
    --aug-repeats). Validation: -vb (default -b) per process, in order. Iterate them with `epoch_batches` and
    `batches`, which give the batches as the model takes them (`DeviceNormalize`). With --device-data the
    training batches come from the device instead (`device_data.DeviceBatches`, iterated the same way). """
    if args.device_data:
        from .device_data import create_device_loaders
        return create_device_loaders(train_set, val_set, args, accelerator, data_config)
    sampler = EpochBatchSampler(
        len(train_set), args.batch_size, args.seed, accelerator.num_processes, args.epoch_repeats,
        args.train_batches_per_epoch, args.aug_repeats)
    if len(sampler) == 0:
        raise UsageError(f'{len(train_set)} training examples do not fill one batch of -b {args.batch_size} on '
                         f'each of {accelerator.num_processes} process(es): lower -b')
    # own generators: starting an iterator draws a base seed, which must not come from the global RNG
    train_loader = torch.utils.data.DataLoader(
        SeededExamples(train_set, args.seed), batch_sampler=sampler,
        generator=torch.Generator().manual_seed(args.seed), **_loader_options(args, args.workers))
    train_loader = accelerator.prepare(train_loader)
    train_loader.epoch_sampler = sampler
    train_loader.to_model = DeviceNormalize(args, data_config, accelerator.device, training=True)
    return train_loader, create_val_loader(val_set, args, accelerator, data_config)


def _loader_options(args, workers: int) -> dict:
    return dict(num_workers=workers, pin_memory=args.pin_mem,
                collate_fn=collate_views if args.no_prefetcher else fast_collate,
                persistent_workers=workers > 0)  # timm's create_loader keeps its workers too


def create_val_loader(val_set, args, accelerator, data_config, workers=None):
    """ The validation loader, prepared: -vb (default -b) per process, in order, --workers unless `workers`. """
    val_loader = accelerator.prepare(torch.utils.data.DataLoader(
        val_set, batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
        generator=torch.Generator().manual_seed(args.seed),
        **_loader_options(args, args.workers if workers is None else workers)))
    val_loader.to_model = DeviceNormalize(args, data_config, accelerator.device, training=False)
    return val_loader


def batches(loader):
    """ The (inputs, targets) batches of a loader made by `create_loaders`, as the model takes them. """
    for inputs, targets in loader:
        yield loader.to_model(inputs), targets


def epoch_batches(train_loader, epoch: int, skip: int = 0):
    """ The (inputs, targets) batches of this process for `epoch`, from batch `skip` on: the same batches,
    bit for bit, as batches skip.. of the whole epoch. """
    sampler = train_loader.epoch_sampler
    if not 0 <= skip <= sampler.batches_per_process:
        raise ValueError(f'skip {skip} is outside 0..{sampler.batches_per_process}')
    sampler.plan(epoch, skip)
    return batches(train_loader)
