""" --device-data: the training split decoded once into a uint8 tensor on the device, and augmented there per
example with timm's training transform, for small images where loader workers decide the speed.

The validation split goes through timm's eval transform once (resize and center crop, uint8) and is fed from
memory by the usual loader, without workers, so that Accelerate still splits it among processes and drops the
duplicates of the last batch. Training batches follow the loader's `EpochBatchSampler`: the same examples in
the same batches as without the option, each process cutting its own share by index. Each batch's augmentation
draws from RNGs seeded from (--seed, epoch, batch, process) alone, so a resumed run draws what it would have.

What runs per batch, in timm's order (`timm.data.create_transform` with its prefetcher, then the prefetcher):
    RandomResizedCropAndInterpolation   kornia draws the boxes as torchvision's get_params does (10 tries of area
                                        and log-aspect, the first that fits, else a center crop); `grid_sample`
                                        resamples them with PIL's geometry (`crop_grid`), each example with its
                                        own interpolation for --train-interpolation random
    RandomHorizontalFlip, VerticalFlip  kornia draws them per example; applied by mirroring the crop's grid
    ColorJitter (--color-jitter, off    kornia's torchvision-compatible ColorJitter: factors per example; the order
    with --aa; --color-jitter-prob)     of the four adjustments is drawn per batch (torchvision: per image)
    normalize, RandomErasing            as the prefetcher: x - 255 mean, / 255 std, then timm's own RandomErasing
Resampling works in float on the device: results differ from PIL's by rounding, by PIL's antialiasing when an
image is shrunk and by the bicubic kernel (torch's a = -0.75, PIL's -0.5), not in what is drawn.
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing

from .errors import UsageError
from .loader import EpochBatchSampler, restored_rngs, seed_rngs

# flag: (is set, why it cannot apply) for what the device pipeline does not build
REFUSED = {
    '--aa': (lambda a: bool(a.aa), 'AutoAugment/RandAugment policies run on PIL images in loader workers'),
    '--aug-splits': (lambda a: a.aug_splits > 0, 'AugMix splits run on PIL images in loader workers'),
    '--no-aug': (lambda a: a.no_aug, 'it is the eval transform on the training split: use the loader'),
    '--train-crop-mode': (lambda a: a.train_crop_mode not in (None, 'rrc'), 'only the RandomResizedCrop mode is built'),
    '--grayscale-prob': (lambda a: bool(a.grayscale_prob), 'random grayscale is not built on the device'),
    '--gaussian-blur-prob': (lambda a: bool(a.gaussian_blur_prob), 'random blur is not built on the device'),
    '--no-prefetcher': (lambda a: a.no_prefetcher, 'batches are normalized on the device, as with the prefetcher'),
}
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest')  # what kornia resamples with (grid_sample's modes)
MEMORY_SHARE = 0.5  # of the device's free memory that the decoded split may take


def check_device_data(args):
    """ UsageError for a flag that --device-data cannot honour. """
    for flag, (is_set, why) in REFUSED.items():
        if is_set(args):
            raise UsageError(f'--device-data cannot take {flag}: {why}; drop one of them')
    interpolation = args.train_interpolation
    if interpolation not in (None, '', 'random') and interpolation not in INTERPOLATIONS:
        raise UsageError(f'--device-data resamples with {", ".join(INTERPOLATIONS)} or random, not '
                         f'--train-interpolation {interpolation}: pick one of them or drop --device-data')


def free_memory(device: torch.device) -> int:
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def decode(dataset, device: torch.device, what: str, chunk: int = 1024):
    """ (uint8 images N x C x H x W, labels) on `device`: every example of `dataset` (its transform gives uint8
    CHW tensors), every image of one size, within MEMORY_SHARE of the free memory. """
    first, _ = dataset[0]
    need, free = len(dataset) * first.numel(), free_memory(device)
    if need > MEMORY_SHARE * free:
        raise UsageError(f'--device-data: the decoded {what} split takes {need / 2 ** 30:.2f} GiB, more than '
                         f'{MEMORY_SHARE:.0%} of the {free / 2 ** 30:.2f} GiB free on {device}: drop --device-data '
                         f'(or train on fewer or smaller images)')
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8, device=device)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for start in range(0, len(dataset), chunk):
        for k, (image, label) in enumerate(dataset.__getitems__(range(start, min(start + chunk, len(dataset))))):
            image = torch.as_tensor(image)
            if image.shape != first.shape:
                raise UsageError(f'--device-data keeps the {what} images in one tensor, so they must share one size: '
                                 f'image {start + k} is {tuple(image.shape)}, image 0 {tuple(first.shape)} '
                                 f'(channels, height, width); resize the data or drop --device-data')
            images[start + k] = image
            labels[start + k] = label
    return images, labels.to(device)


def untransformed(dataset):
    """ An ImageClassification as it is, with its images as uint8 tensors at their own size. """
    from torchvision.transforms import PILToTensor

    copy = object.__new__(type(dataset))
    copy.__dict__.update(dataset.__dict__, transform=PILToTensor())
    return copy


class DeviceAugment:
    """ timm's training transform and the prefetcher's normalization and erasing, per example, on a uint8 batch on
    the device (see the module's docstring); `draw` and `apply` apart, so the draws can be compared with timm's.
    Every draw is from the CPU generator and python's `random` (the erasing), so seeding them decides a batch. """

    def __init__(self, args, data_config, device: torch.device):
        import kornia.augmentation as K

        self.size = tuple(data_config['input_size'][1:])
        interpolation = args.train_interpolation or data_config['interpolation']
        self.interpolations = ('bilinear', 'bicubic') if interpolation == 'random' else (interpolation,)
        self.crop = K.RandomResizedCrop(self.size, scale=tuple(args.scale), ratio=tuple(args.ratio))
        self.hflip = K.RandomHorizontalFlip(p=args.hflip) if args.hflip > 0 else None
        self.vflip = K.RandomVerticalFlip(p=args.vflip) if args.vflip > 0 else None
        channels = data_config['input_size'][0]
        jitter = (args.color_jitter,) * 3 if not args.aa and args.color_jitter else None
        if jitter and channels != 3:  # torchvision leaves saturation and hue alone on a grayscale image
            jitter = (jitter[0], jitter[1], 0.0)
        self.jitter = K.ColorJitter(*jitter, p=1.0 if args.color_jitter_prob is None else args.color_jitter_prob) \
            if jitter and any(jitter) else None
        self.mean = torch.tensor([255 * m for m in data_config['mean']], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in data_config['std']], device=device).view(1, -1, 1, 1)
        self.erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device) \
            if args.reprob > 0 else None

    def draw(self, shape) -> dict:
        """ The parameters of a batch of `shape` (B, C, H, W): crop boxes (kornia's corner points), each example's
        interpolation, the flips' and the jitter's kornia parameters. """
        params = {'crop': self.crop.forward_parameters(torch.Size(shape)),
                  'interpolation': torch.randint(len(self.interpolations), (shape[0],))}
        for name in ('hflip', 'vflip', 'jitter'):
            module = getattr(self, name)
            if module is not None:
                params[name] = module.forward_parameters(torch.Size((shape[0], shape[1], *self.size)))
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        x = images.float().div_(255)
        grid = crop_grid(params['crop']['src'].to(x.device), x.shape[-2:], self.size)
        # A flip of the resized crop is the same samples in mirrored order: flipping the grid is exact and saves
        # kornia's flip modules (half a millisecond each per 128 images on this CPU)
        for name, axis in (('hflip', 2), ('vflip', 1)):
            if name in params:
                flipped = params[name]['batch_prob'].to(x.device, torch.bool).view(-1, 1, 1, 1)
                grid = torch.where(flipped, grid.flip(axis), grid)
        def resample(rows, mode):
            return F.grid_sample(x[rows], grid[rows], mode=mode, padding_mode='border', align_corners=False)

        if len(self.interpolations) == 1:  # the whole batch, without a gather and scatter
            out = resample(slice(None), self.interpolations[0])
        else:
            out = x.new_empty((len(x), x.shape[1], *self.size))
            for k, mode in enumerate(self.interpolations):
                rows = (params['interpolation'] == k).nonzero().squeeze(1).to(x.device)
                if len(rows):
                    out[rows] = resample(rows, mode)
        if 'jitter' in params:
            out = self.jitter(out.clamp_(0, 1), params=params['jitter'])
        out = out.mul_(255).sub_(self.mean).div_(self.std)
        return self.erase(out) if self.erase is not None else out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape))


def crop_grid(corners: torch.Tensor, in_size, out_size) -> torch.Tensor:
    """ The sampling grid of each example's crop, resized as PIL resizes a crop: the box's edges onto the output's,
    pixel centers at +0.5 (`grid_sample` with align_corners=False), the box's edge pixels repeated beyond it (PIL's
    filter drops the weights outside the cropped image). Written here rather than kornia's crop_and_resize, which maps
    the corner pixels' centers onto each other (align_corners=True): on small images that is another geometry than
    the eval transform's PIL resize, and it cost about a point of accuracy on the 8x8 digits. `corners`: kornia's
    (B, 4, 2) boxes, (x, y) of the top-left, top-right, bottom-right, bottom-left pixels. """
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    left, top = corners[:, 0, 0], corners[:, 0, 1]
    width, height = corners[:, 2, 0] - left + 1, corners[:, 2, 1] - top + 1
    theta = torch.zeros(len(corners), 2, 3, device=corners.device)
    theta[:, 0, 0], theta[:, 0, 2] = width / in_w, (2 * left + width) / in_w - 1
    theta[:, 1, 1], theta[:, 1, 2] = height / in_h, (2 * top + height) / in_h - 1
    grid = F.affine_grid(theta, (len(corners), 1, out_h, out_w), align_corners=False)
    # PIL crops, then resizes: near the box's edges it repeats the box's edge pixels, not those around the box
    for axis, start, size, extent in ((0, left, width, in_w), (1, top, height, in_h)):
        low, high = (2 * start + 1) / extent - 1, (2 * (start + size - 1) + 1) / extent - 1
        grid[..., axis] = torch.maximum(torch.minimum(grid[..., axis], high.view(-1, 1, 1)), low.view(-1, 1, 1))
    return grid


@contextmanager
def seeded(device: torch.device, *entropy: int):
    """ The CPU generator, python's `random` and numpy (and the device's generator, which RandomErasing's noise
    draws from on CUDA) seeded from `entropy` inside the block, and back as they were after it. """
    # restored_rngs forks the CPU generator; the device's is forked only where there is one
    with restored_rngs(), torch.random.fork_rng(devices=[device]) if device.type == 'cuda' else nullcontext():
        seed_rngs(*entropy)
        if device.type == 'cuda':
            torch.cuda.manual_seed(torch.randint(2 ** 62, ()).item())
        yield


class DeviceBatches:
    """ The training batches of this process, cut from the split on the device and augmented there; iterated as
    a prepared training loader is (`epoch_sampler`, `to_model`, len = batches per process). """

    def __init__(self, images, labels, sampler: EpochBatchSampler, augment: DeviceAugment, to_model, seed: int,
                 process_index: int, num_processes: int):
        self.images, self.labels, self.epoch_sampler, self.augment = images, labels, sampler, augment
        self.to_model, self.seed = to_model, seed
        self.process_index, self.num_processes = process_index, num_processes

    def __len__(self):
        return self.epoch_sampler.batches_per_process

    def __iter__(self):
        sampler = self.epoch_sampler
        for j, keys in enumerate(sampler):
            if j % self.num_processes != self.process_index:
                continue
            batch = sampler.skip * self.num_processes + j  # its place in the epoch, whatever was skipped
            index = torch.tensor([key[2] for key in keys], device=self.images.device)
            with seeded(self.images.device, self.seed, sampler.epoch, batch):
                inputs = self.augment(self.images[index])
            yield inputs, self.labels[index]


class DecodedSplit(torch.utils.data.Dataset):
    """ A split held in memory as uint8 tensors, read by index (`__getitems__` for a batch at once). """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels.tolist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices):
        return [(self.images[i], self.labels[i]) for i in indices]


def create_device_loaders(train_set, val_set, args, accelerator, data_config):
    """ (train batches, val_loader) for --device-data, in place of `create_loaders`' (whose validation loader
    this builds on the decoded split). """
    from .loader import DeviceNormalize, create_val_loader

    device = accelerator.device
    images, labels = decode(untransformed(train_set), device, 'training')
    val_images, val_labels = decode(val_set, torch.device('cpu'), 'validation')  # timm's eval transform, once
    sampler = EpochBatchSampler(len(images), args.batch_size, args.seed, accelerator.num_processes,
                                args.epoch_repeats, args.train_batches_per_epoch, args.aug_repeats)
    if len(sampler) == 0:
        raise UsageError(f'{len(images)} training examples do not fill one batch of -b {args.batch_size} on '
                         f'each of {accelerator.num_processes} process(es): lower -b')
    train = DeviceBatches(images, labels, sampler, DeviceAugment(args, data_config, device),
                          DeviceNormalize(args, data_config, device, training=True, normalize=False), args.seed,
                          accelerator.process_index, accelerator.num_processes)
    return train, create_val_loader(DecodedSplit(val_images, val_labels), args, accelerator, data_config, workers=0)
