""" What each part around the step costs train.py, measured on this machine: the guard, the data pipeline, and
the fixed costs of a run (imports, reading the data, a checkpoint, an export).

    python benchmarks/costs.py      # alone; writes benchmarks/results/costs.md

The step parts come from benchmarks/speed.py (interleaved rounds in one process): SGD + timm Mixup in a bare loop,
through `gmix_step` with the default guard ('skip') and with 'undo'. The data pipeline is timed in this process,
one core, on the image folder of benchmarks/vs_timm.py: images per second of a training batch's worth of
examples, as a loader worker makes them (uint8 for timm's prefetcher, float with --no-prefetcher, with and without
the per-example seeding that makes resume exact), and --device-data's augmentation of whole batches. Fixed costs are medians of --rounds, each in a fresh process
for the imports.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))


def seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_seconds(code: str, rounds: int) -> float:
    return seconds(lambda: subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True), rounds)


def own_import_seconds(module: str, after: str, rounds: int) -> float:
    """ What importing `module` adds once `after` is imported: its cumulative time in `python -X importtime`. """
    def once():
        err = subprocess.run([sys.executable, '-X', 'importtime', '-c', f'import {after}; import {module}'], cwd=ROOT,
                             check=True, capture_output=True, text=True).stderr
        return next(int(line.split('|')[1]) for line in err.splitlines() if line.split('|')[-1].strip() == module
                    and not line.split('|')[-1].startswith('  ')) / 1e6
    return statistics.median(once() for _ in range(rounds))


def data_pipeline(data, rounds: int) -> dict:
    """ Images/s of the worker's part of the pipeline, one core. """
    import torch
    from timm_gmix.training.args import parse_args
    from timm_gmix.training.data import load_splits
    from timm_gmix.training.factory import create_model
    from timm_gmix.training.loader import SeededExamples, with_transforms

    torch.set_num_threads(1)
    rates = {}
    for name, extra, seeded in (('uint8 (prefetcher), seeded per example: the default', [], True),
                                ('uint8 (prefetcher), not seeded', [], False),
                                ('float (--no-prefetcher), seeded per example', ['--no-prefetcher'], True)):
        args = parse_args([str(data), '--model', 'resnet18', '--img-size', '32', '--num-classes', '10', *extra])
        train, val, num_classes = load_splits(args)
        train_set, _, _ = with_transforms(train, val, args, create_model(args, num_classes))
        keys = [(0, 0, i) for i in range(512)]
        fetch = (lambda: SeededExamples(train_set, 0).__getitems__(keys)) if seeded else \
            (lambda: train_set.__getitems__([i for _, _, i in keys]))
        fetch()
        rates[name] = len(keys) / seconds(fetch, rounds)
    rates['--device-data: the same augmentation of batches of 64 on the device (this CPU), drawn per example'] = \
        device_augmentation(data, rounds)
    return rates


def device_augmentation(data, rounds: int) -> float:
    """ Images/s of --device-data's augmentation (crop, flip, jitter, normalization) on 512 decoded images. """
    import torch
    from timm_gmix.training.args import parse_args
    from timm_gmix.training.data import load_splits
    from timm_gmix.training.device_data import DeviceAugment, decode, untransformed
    from timm_gmix.training.factory import create_model
    from timm_gmix.training.loader import with_transforms

    args = parse_args([str(data), '--model', 'resnet18', '--img-size', '32', '--num-classes', '10', '--device-data'])
    train, val, num_classes = load_splits(args)
    train_set, _, data_config = with_transforms(train, val, args, create_model(args, num_classes))
    images, _ = decode(untransformed(train_set), torch.device('cpu'), 'training')
    augment = DeviceAugment(args, data_config, torch.device('cpu'))
    batches = images[:512].split(64)

    def once():
        for batch in batches:
            augment(batch)

    once()
    return 512 / seconds(once, rounds)


def fixed_costs(data, rounds: int) -> dict:
    import timm
    import torch
    from accelerate import Accelerator
    from timm.optim import create_optimizer_v2
    from timm_gmix.training.args import parse_args
    from timm_gmix.training.checkpoint import save_state
    from timm_gmix.training.data import load_splits
    from timm_gmix.training.export import export_model

    costs = {
        'python -c "import timm" (what any timm script pays)': import_seconds('import timm', rounds),
        'what `import train` adds to `import timm` (python -X importtime)': own_import_seconds('train', 'timm', rounds),
        'reading the image folder (load_splits, with `import datasets`)': import_seconds(
            f'from timm_gmix.training.args import parse_args; from timm_gmix.training.data import load_splits; '
            f'load_splits(parse_args([{str(data)!r}]))', rounds) - import_seconds(
            'from timm_gmix.training.args import parse_args; from timm_gmix.training.data import load_splits', rounds),
    }
    args = parse_args([str(data), '--model', 'resnet18', '--img-size', '32'])
    load_splits(args)
    model = timm.create_model('resnet18', num_classes=10)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, create_optimizer_v2(model, opt='sgd', lr=0.1, momentum=0.9))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # a momentum to save
    with tempfile.TemporaryDirectory() as tmp:
        costs['a training state, last/ (resnet18: weights, momentum, RNG; Accelerate)'] = seconds(
            lambda: save_state(accelerator, Path(tmp) / 'last', {'position': (1, 0)}), rounds)
        data_config = {'input_size': (3, 32, 32), 'interpolation': 'bicubic', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
                       'crop_pct': 1.0, 'crop_mode': 'center'}
        card = {'dataset': 'x', 'num_train': 1, 'num_val': 1, 'label_names': None, 'final': None,
                'best_metric': None, 'best_epoch': None, 'eval_metric': 'top1', 'epochs_trained': 1}
        costs['an exported model, model_best/ (timm save_for_hf and a model card)'] = seconds(
            lambda: export_model(accelerator.unwrap_model(model), Path(tmp) / 'model_best', args, data_config, card),
            rounds)
    return costs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--speed-rounds', type=int, default=15)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'costs.md'))
    args = parser.parse_args()
    from vs_timm import PRESETS, image_folder
    side, num_train, num_val, _ = PRESETS['cpu']
    data = image_folder(side, num_train, num_val)

    speed_json = Path(tempfile.mkdtemp()) / 'speed.json'
    speed_cmd = [sys.executable, 'benchmarks/speed.py', '--modes', 'sgd_mixup', 'sgd_mixup_guarded',
                 'sgd_mixup_guarded:guard=undo', 'g', 'g:guard=undo', '--rounds', str(args.speed_rounds), '--steps',
                 '5', '--json', str(speed_json)]
    subprocess.run(speed_cmd, cwd=ROOT, check=True, capture_output=True)
    step = json.loads(speed_json.read_text())
    pipeline = data_pipeline(data, args.rounds)
    fixed = fixed_costs(data, args.rounds)

    lines = [
        'What the parts around the step cost train.py on this machine (2 CPU cores): resnet18 at 32x32, batch 64, '
        'SGD + timm Mixup, the image folder of benchmarks/vs_timm.py.',
        '',
        f'Command: `{" ".join(["python benchmarks/costs.py", *sys.argv[1:]])}` (the step: '
        f'`{" ".join(speed_cmd[1:-2])}`)',
        '',
        '| per update | step time / bare SGD + Mixup step (median of interleaved rounds) |',
        '| --- | ---: |',
        f'| gmix_step, default guard (skip): gradient norm, BatchNorm buffers copy, one host read | '
        f'{step["sgd_mixup_guarded"]:.3f} |',
        f'| gmix_step, guard undo: also a copy of the weights and momentum and their finiteness check | '
        f'{step["sgd_mixup_guarded:guard=undo"]:.3f} |',
        f'| G-Mix, default guard | {step["g"]:.3f} |',
        f'| G-Mix, guard undo (w is SAM\'s own copy; the momentum copy and the check are extra) | '
        f'{step["g:guard=undo"]:.3f} |',
        '',
        '| per image, in a loader worker (one core) | images/s |',
        '| --- | ---: |',
        *[f'| {name} | {rate:.0f} |' for name, rate in pipeline.items()],
        '',
        '| per run or per epoch | seconds (median) |',
        '| --- | ---: |',
        *[f'| {name} | {value:.3f} |' for name, value in fixed.items()],
    ]
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
