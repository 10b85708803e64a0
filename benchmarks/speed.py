""" Step time and peak memory of SAM, G-Mix, BG-Mix and DG-Mix relative to plain SGD with timm's Mixup.

    python benchmarks/speed.py                                  # resnet18, 32x32, batch 64
    python benchmarks/speed.py --model vit_tiny_patch16_224 --img-size 224 -b 32

Every mode runs in this one process, on the same model (one copy each, same initial weights) and the same
batch. Rounds are interleaved: each round times `--steps` steps of every mode, in a shuffled order, and the
reported figure is the median over rounds of the per-round ratio to the reference (`sgd_mixup`), so drift in
machine speed cancels. Peak memory is the peak of one step: `torch.cuda.max_memory_allocated` on a GPU, the
profiler's memory timeline on the CPU.

`naive_sam` is the textbook SAM loop with timm's Mixup, written here as the reference a user would write by
hand; `g` is timm_gmix's step on the same mixed batch.
"""
import argparse
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

import timm_gmix


def naive_sam_step(model, optimizer, mixup_fn, x, y, rho=0.05):
    """ The textbook SAM step: e = rho * g / ||g||, w + e, gradient there, w - e, base step. """
    x, target = mixup_fn(x, y)
    loss_fn = SoftTargetCrossEntropy()
    loss_fn(model(x), target).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
        eps = [p.grad * (rho / (norm + 1e-12)) for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    optimizer.zero_grad()
    loss_fn(model(x), target).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    optimizer.step()
    optimizer.zero_grad()


def sgd_mixup_step(model, optimizer, mixup_fn, x, y):
    x, target = mixup_fn(x, y)
    SoftTargetCrossEntropy()(model(x), target).backward()
    optimizer.step()
    optimizer.zero_grad()


def build_modes(args, device):
    """ mode name -> a function making one training step on (x, y), each with its own model and optimizer. """
    torch.manual_seed(args.seed)
    base_model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs).to(device).train()
    mix = dict(mixup_alpha=0.8, label_smoothing=0.1, num_classes=args.num_classes)

    def make(opt, **opt_kwargs):
        model = copy.deepcopy(base_model)
        return model, create_optimizer_v2(model, opt=opt, lr=0.01, weight_decay=5e-4, **opt_kwargs)

    def gmix(mode, mixup=True, **kw):
        model, opt = make('gmix_sam', base='sgd', rho=0.05)
        mixup_fn = timm_gmix.GMixup(**mix, mode=mode, gmix_ratio=args.gamma) if mixup else None
        return lambda x, y: timm_gmix.gmix_step(model, opt, x, y, mixup_fn, **kw)

    def plain(step_fn, opt, **opt_kwargs):
        model, optimizer = make(opt, **opt_kwargs)
        mixup_fn = Mixup(**mix)
        return lambda x, y: step_fn(model, optimizer, mixup_fn, x, y)

    return {
        'sgd_mixup': plain(sgd_mixup_step, 'sgd'),
        'naive_sam': plain(naive_sam_step, 'sgd'),
        'sam': gmix('g', mixup=False),
        'g': gmix('g'),
        'bg': gmix('bg'),
        'dg': gmix('dg'),
    }


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def peak_memory(step, batch, device) -> float:
    """ Peak bytes allocated during one step. """
    x, y = batch
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(x.clone(), y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(x.clone(), y)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'memory.json'
        prof.export_memory_timeline(str(path), device='cpu')
        _, sizes = json.loads(path.read_text())
    return float(max(sum(s) for s in sizes))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--model-kwargs', type=json.loads, default={}, help='JSON, e.g. {"img_size": 32}')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--gamma', type=float, default=0.5)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--steps', type=int, default=3, help='steps of each mode per round')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=None, help='write the Markdown table here')
    args = parser.parse_args()

    device = torch.device(args.device)
    modes = build_modes(args, device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    for step in modes.values():
        for _ in range(args.warmup):
            step(x.clone(), y)
    times = {name: [] for name in modes}
    order = list(modes)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                modes[name](x.clone(), y)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    memory = {name: peak_memory(step, (x, y), device) for name, step in modes.items()}

    def ratio(name, ref):
        return statistics.median(t / r for t, r in zip(times[name], times[ref]))

    rows = [
        (name, statistics.median(times[name]) * 1e3, ratio(name, 'sgd_mixup'), ratio(name, 'naive_sam'),
         ratio(name, 'g'), memory[name] / memory['sgd_mixup'])
        for name in modes
    ]
    machine = (torch.cuda.get_device_name() if device.type == 'cuda'
               else f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads')
    lines = [
        f'Model `{args.model}` {args.img_size}x{args.img_size}, batch {args.batch_size}, gamma {args.gamma}, '
        f'{args.rounds} interleaved rounds of {args.steps} steps; {device.type} ({machine}), torch {torch.__version__}.',
        '',
        f'Command: `python benchmarks/speed.py {" ".join(sys.argv[1:])}`',
        '',
        '| mode | step (ms, median) | time / sgd_mixup | time / naive_sam | time / g | peak memory / sgd_mixup |',
        '| --- | ---: | ---: | ---: | ---: | ---: |',
        *[f'| {n} | {ms:.1f} | {a:.3f} | {b:.3f} | {c:.3f} | {m:.3f} |' for n, ms, a, b, c, m in rows],
    ]
    print('\n'.join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
