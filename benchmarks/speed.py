""" Step time and peak memory of SAM, G-Mix, BG-Mix and DG-Mix relative to plain SGD with timm's Mixup.

    python benchmarks/speed.py                                  # resnet18, 32x32, batch 64
    python benchmarks/speed.py --model vit_tiny_patch16_224 --img-size 224 -b 32
    python benchmarks/speed.py --device cuda --model resnet50 --img-size 224 -b 128 --precision bf16 --compile
    python benchmarks/speed.py --modes sgd_mixup g g:perturb=momentum dg dg:interval=8,reuse=0.7 --json r.json

A mode is a name with optional options after a colon: `sgd` (no mixing), `sgd_mixup`, `sgd_mixup_guarded`
(the same through `gmix_step`, as train.py runs it, with the step guard that every G-Mix mode pays too),
`naive_sam`, `sam` (no mixing), `g`, `bg`, `dg`; SAM options `interval=K`, `reuse=ALPHA`, `perturb=momentum`,
`adaptive` (ASAM); `guard=undo` for the modes through `gmix_step` (default: skip).
A mode with interval K is timed over a multiple of K steps per round, so each round holds its share of full
steps. `--opt` is the optimizer of the plain modes and the one SAM wraps.

Every mode runs in this one process, on the same model (one copy each, same initial weights) and the same
batch. Rounds are interleaved: each round times `--steps` steps of every mode, in a shuffled order, and the
reported figure is the median over rounds of the per-round ratio to the reference (`sgd_mixup`), so drift in
machine speed cancels. Peak memory is the peak of one step: `torch.cuda.max_memory_allocated` on a GPU, the
profiler's memory timeline on the CPU.

`naive_sam` is the textbook SAM loop with timm's Mixup, written here as the reference a user would write by
hand; `g` is timm_gmix's step on the same mixed batch.

On a GPU (the default when one is present) the batch is synthetic random data made on the device. With
`--precision fp16|bf16` every mode runs through one Accelerator with that mixed precision (autocast; fp16 adds
Accelerate's GradScaler: the hand-written loops step through the prepared optimizer, gmix_step uses the
accelerator), and `--compile` runs every mode on `torch.compile(model)` (inductor; the warm-up steps compile, so
raise `--warmup` if a mode still compiles in the timed rounds). The GPU table adds images per second and the
absolute peak memory of a step.

train.py as a whole (data, start-up, checkpoints) is measured against timm's own train.py by
benchmarks/vs_timm.py.
"""
import argparse
import contextlib
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


def forward_backward(model, x, target, accelerator=None):
    """ Cross-entropy (soft targets, or class indices with label smoothing 0.1) and its gradient, under the
    accelerator's autocast and loss scale if given. """
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        logits = model(x)
        loss = SoftTargetCrossEntropy()(logits, target) if target.ndim > 1 else \
            torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()


def naive_sam_step(model, optimizer, mixup_fn, x, y, accelerator=None, rho=0.05):
    """ The textbook SAM step: e = rho * g / ||g||, w + e, gradient there, w - e, base step. A loss scale
    cancels in e, and the prepared optimizer unscales before its step. """
    x, target = mixup_fn(x, y)
    forward_backward(model, x, target, accelerator)
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
        eps = [p.grad * (rho / (norm + 1e-12)) for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    optimizer.zero_grad()
    forward_backward(model, x, target, accelerator)
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    optimizer.step()
    optimizer.zero_grad()


def sgd_mixup_step(model, optimizer, mixup_fn, x, y, accelerator=None):
    x, target = mixup_fn(x, y) if mixup_fn is not None else (x, y)
    forward_backward(model, x, target, accelerator)
    optimizer.step()
    optimizer.zero_grad()


MODES = ('sgd_mixup', 'naive_sam', 'sam', 'g', 'bg', 'dg')  # the default list
NAMES = ('sgd', 'sgd_mixup_guarded', *MODES)
SAM_OPTIONS = {'interval': int, 'reuse': float, 'perturb': str, 'adaptive': bool, 'guard': str}
REFERENCE = 'sgd_mixup'  # every ratio divides by it; naive_sam and g get a column too when they are run


def parse_mode(spec: str):
    """ 'dg:interval=8,reuse=0.7' -> ('dg', {'interval': 8, 'reuse': 0.7}). """
    name, _, options = spec.partition(':')
    if name not in NAMES:
        raise ValueError(f'unknown mode {name!r} in {spec!r}: choose from {", ".join(NAMES)}')
    parsed = {}
    for option in filter(None, options.split(',')):
        key, _, value = option.partition('=')
        allowed = list(SAM_OPTIONS) if name in ('sam', 'g', 'bg', 'dg') else \
            ['guard'] if name == 'sgd_mixup_guarded' else []
        if key not in allowed:
            raise ValueError(f'{spec!r}: {name} takes {", ".join(allowed) or "no options"}')
        parsed[key] = True if SAM_OPTIONS[key] is bool else SAM_OPTIONS[key](value)
    return name, parsed


def build_modes(args, device, accelerator=None):
    """ mode name -> a function making one training step on (x, y), each with its own model and optimizer
    (prepared by `accelerator` if given, compiled with --compile). """
    torch.manual_seed(args.seed)
    base_model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs).to(device).train()
    if args.channels_last:
        base_model = base_model.to(memory_format=torch.channels_last)
    mix = dict(mixup_alpha=0.8, label_smoothing=0.1, num_classes=args.num_classes)

    def make(opt, **opt_kwargs):
        model = copy.deepcopy(base_model)
        optimizer = create_optimizer_v2(model, opt=opt, lr=0.01, weight_decay=5e-4, momentum=0.9, **opt_kwargs)
        if accelerator is not None:
            model, optimizer = accelerator.prepare(model, optimizer)
        return (torch.compile(model) if args.compile else model), optimizer

    def gmix(mode, mixup=True, adaptive=False, guard='skip', **options):
        model, opt = make('gmix_sam', base=args.opt, rho=2.0 if adaptive else 0.05, adaptive=adaptive, **options)
        mixup_fn = timm_gmix.GMixup(**mix, mode=mode, gmix_ratio=args.gamma) if mixup else None
        return lambda x, y: timm_gmix.gmix_step(model, opt, x, y, mixup_fn, accelerator=accelerator, guard=guard)

    def plain(step_fn, mixup=True):
        model, optimizer = make(args.opt)
        mixup_fn = Mixup(**mix) if mixup else None
        return lambda x, y: step_fn(model, optimizer, mixup_fn, x, y, accelerator)

    def guarded(guard='skip'):
        model, optimizer = make(args.opt)
        mixup_fn = Mixup(**mix)
        return lambda x, y: timm_gmix.gmix_step(model, optimizer, x, y, mixup_fn, accelerator=accelerator, guard=guard)

    builders = {
        'sgd': lambda: plain(sgd_mixup_step, mixup=False),
        'sgd_mixup_guarded': guarded,
        'sgd_mixup': lambda: plain(sgd_mixup_step),
        'naive_sam': lambda: plain(naive_sam_step),
        'sam': lambda **options: gmix('g', mixup=False, **options),
        'g': lambda **options: gmix('g', **options),
        'bg': lambda **options: gmix('bg', **options),
        'dg': lambda **options: gmix('dg', **options),
    }
    modes = {}
    for spec in args.modes:
        name, options = parse_mode(spec)
        modes[spec] = builders[name](**options)
    return modes


def steps_per_round(spec: str, steps: int) -> int:
    """ `steps` rounded up to a multiple of the mode's SAM interval. """
    interval = parse_mode(spec)[1].get('interval', 1)
    return -(-steps // interval) * interval


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
    parser.add_argument('--precision', default='no', choices=('no', 'fp16', 'bf16'),
                        help="mixed precision through Accelerate (its names); 'no': float32 without an Accelerator")
    parser.add_argument('--compile', action='store_true', help='torch.compile every mode (inductor)')
    parser.add_argument('--channels-last', action='store_true', help='model and batch in channels-last layout')
    parser.add_argument('--opt', default='sgd', help="the plain modes' optimizer and the one SAM wraps")
    parser.add_argument('--modes', nargs='+', default=list(MODES),
                        help=f'mode specs (see above; fewer compile faster with --compile); {REFERENCE} is needed')
    parser.add_argument('--out', default=None, help='write the Markdown table here')
    parser.add_argument('--json', default=None, help='write {mode: step time / sgd_mixup} here')
    args = parser.parse_args()
    try:
        [parse_mode(spec) for spec in args.modes]
    except ValueError as e:
        parser.error(str(e))
    if REFERENCE not in args.modes:
        parser.error(f'--modes must include {REFERENCE}, the reference of every ratio')
    device = torch.device(args.device)
    modes = build_modes(args, device, make_accelerator(args, device))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    for step in modes.values():
        for _ in range(args.warmup):
            step(x.clone(), y)
    times = {name: [] for name in modes}
    order = list(modes)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            steps = steps_per_round(name, args.steps)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                modes[name](x.clone(), y)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    memory = {name: peak_memory(step, (x, y), device) for name, step in modes.items()}

    def ratio(name, ref):
        return statistics.median(t / r for t, r in zip(times[name], times[ref]))

    columns = {'step (ms, median)': lambda n: f'{statistics.median(times[n]) * 1e3:.1f}'}
    for ref in (REFERENCE, 'naive_sam', 'g'):
        if ref in modes:
            columns[f'time / {ref}'] = lambda n, ref=ref: f'{ratio(n, ref):.3f}'
    columns['peak memory / sgd_mixup'] = lambda n: f'{memory[n] / memory[REFERENCE]:.3f}'
    if device.type == 'cuda':  # the CPU table stays as committed in results/speed.md
        columns['images/s'] = lambda n: f'{args.batch_size / statistics.median(times[n]):.0f}'
        columns['peak memory (MiB)'] = lambda n: f'{memory[n] / 2 ** 20:.0f}'
    setup = ''.join(f', {flag}' for flag, on in (
        (f'{args.precision} mixed precision', args.precision != 'no'), ('torch.compile', args.compile),
        ('channels-last', args.channels_last)) if on)
    if args.json:
        Path(args.json).write_text(json.dumps({n: ratio(n, REFERENCE) for n in modes}, indent=1) + '\n')
    lines = [
        f'Model `{args.model}` {args.img_size}x{args.img_size}, batch {args.batch_size}, optimizer {args.opt}, '
        f'gamma {args.gamma}{setup}, {args.rounds} interleaved rounds of {args.steps} steps (a multiple of a '
        f'mode\'s interval); {device.type} ({machine_name(device)}), torch {torch.__version__}.',
        '',
        f'Command: `python benchmarks/speed.py {" ".join(sys.argv[1:])}`',
        '',
        '| mode | ' + ' | '.join(columns) + ' |',
        '| --- |' + ' ---: |' * len(columns),
        *['| ' + ' | '.join([name, *(cell(name) for cell in columns.values())]) + ' |' for name in modes],
    ]
    write(lines, args.out)


def make_accelerator(args, device):
    """ One Accelerator for every mode on a GPU or with mixed precision (fp16 brings its GradScaler); none for
    float32 on the CPU, as the committed CPU tables were measured. """
    if device.type == 'cpu' and args.precision == 'no':
        return None
    from accelerate import Accelerator
    return Accelerator(cpu=device.type == 'cpu', mixed_precision=args.precision)


def machine_name(device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'


def write(lines, out):
    print('\n'.join(lines))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
