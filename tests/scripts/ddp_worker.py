""" Worker for tests/test_distributed.py, started by `accelerate launch` with two CPU processes:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... ddp_worker.py OUT SCENARIO...

Each scenario runs a few `gmix_step`s through Accelerate's DDP (gloo) and returns tensors; every rank
writes `OUT/rank<r>.pt` = {'meta': {...}, scenario: {...}} for the test to compare. Scenarios:

    dg      CNN with BatchNorm, DG-Mix, SAM around SGD, each rank its own data (ascent under no_sync)
    sync    float64 MLP, plain SAM, no mixing: the whole batch split over the ranks, with and without
            sync_ascent, and the one-process reference on the whole batch
    g       CNN with BatchNorm, G-Mix, each rank its own data (run it under `--mixed_precision bf16`)
    looksam as dg, with a full step every 2 updates and LookSAM's reuse: the one-pass update in between adds
            the reused direction, which each rank kept from its own ascent gradient
"""
import copy
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.optim import create_optimizer_v2

from timm_gmix import GMixup, gmix_step

torch.set_num_threads(1)
NUM_CLASSES = 10
STEPS = 3


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws lam from numpy
    torch.manual_seed(seed)


def cnn():
    seed_all(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))


def mlp():
    seed_all(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES)).double()


def batch(size, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 4, 4, generator=g).to(dtype), torch.randint(0, NUM_CLASSES, (size,), generator=g)


def sam(model, **options):
    return create_optimizer_v2(model, opt='gmix_sam', lr=0.1, base='sgd', rho=0.05, momentum=0.9, weight_decay=1e-3,
                               **options)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mixed_steps(accelerator, mode, **options):
    """ A few steps of `mode` on a CNN with BatchNorm; each rank draws its own batches and lam. """
    model = cnn()
    init = weights(model)
    # Accelerate casts the model's outputs back to float32: look at a layer's output for the compute dtype.
    compute_dtypes = set()
    model[-1].register_forward_hook(lambda module, args, output: compute_dtypes.add(str(output.dtype)))
    model, opt = accelerator.prepare(model, sam(model, **options))
    mixup_fn = GMixup(mixup_alpha=0.8, mode=mode, gmix_ratio=0.5, num_classes=NUM_CLASSES)
    seed_all(100 + accelerator.process_index)
    losses = []
    for step in range(STEPS):
        x, y = batch(8, seed=10 * step + accelerator.process_index)
        result = gmix_step(model, opt, x, y, mixup_fn, accelerator=accelerator)
        assert not result.skipped, f'step {step} was skipped'
        losses.append(result.loss.float())
    after_steps = weights(accelerator.unwrap_model(model))
    # As in DDP without SAM, each rank's BatchNorm running statistics include its own last batch until the
    # next forward broadcasts rank 0's: train.py's validation forward does that.
    model.eval()
    with torch.no_grad():
        model(batch(2, seed=0)[0])
    return {'init': init, 'after_steps': after_steps, 'after_eval': weights(accelerator.unwrap_model(model)),
            'losses': torch.stack(losses), 'compute_dtypes': sorted(compute_dtypes),
            'reused': [t.clone() for t in opt.optimizer.looksam.parts()] if opt.optimizer.looksam else []}


def scenario_dg(accelerator):
    return mixed_steps(accelerator, 'dg')


def scenario_g(accelerator):
    return mixed_steps(accelerator, 'g')


def scenario_looksam(accelerator):
    return mixed_steps(accelerator, 'dg', interval=2, reuse=0.5)


def scenario_sync(accelerator):
    """ Rank r takes half r of each whole batch of 16; the reference takes the whole batch in one process. """
    model = mlp()
    batches = [batch(16, seed=step, dtype=torch.float64) for step in range(STEPS)]
    out = {}
    for sync_ascent in (True, False):
        replica = copy.deepcopy(model)
        replica, opt = accelerator.prepare(replica, sam(replica))
        for x, y in batches:
            half = slice(8 * accelerator.process_index, 8 * (accelerator.process_index + 1))
            result = gmix_step(replica, opt, x[half], y[half], accelerator=accelerator, sync_ascent=sync_ascent)
            assert not result.skipped
        out['sync_ascent' if sync_ascent else 'no_sync_ascent'] = weights(accelerator.unwrap_model(replica))
    reference = copy.deepcopy(model)
    opt = sam(reference)
    for x, y in batches:
        assert not gmix_step(reference, opt, x, y).skipped
    out['reference'] = weights(reference)
    return out


SCENARIOS = {'dg': scenario_dg, 'sync': scenario_sync, 'g': scenario_g, 'looksam': scenario_looksam}


def main(out_dir, *scenarios):
    accelerator = Accelerator()
    results = {'meta': {'num_processes': accelerator.num_processes, 'mixed_precision': accelerator.mixed_precision,
                        'distributed_type': str(accelerator.distributed_type)}}
    for name in scenarios:
        results[name] = SCENARIOS[name](accelerator)
    torch.save(results, Path(out_dir) / f'rank{accelerator.process_index}.pt')
    accelerator.wait_for_everyone()


if __name__ == '__main__':
    main(*sys.argv[1:])
