""" Accuracy benchmark: ERM, Mixup, CutMix, SAM, ASAM, G-Mix, BG-Mix, DG-Mix on the built-in digits, limited data.

    python benchmarks/accuracy.py                 # about an hour on 2 CPU cores; stop and rerun to continue
    python benchmarks/accuracy.py --report-only   # rebuild the table and plot from the CSV

Every run goes through train.py itself (`train.main`), on the digits split three ways with a fixed seed: a
fraction of the training split (`--train-subset`, the limited-data setting), the validation split used only to
choose hyperparameters, and the test split used only for the reported numbers (the last epoch's accuracy, no
selection on test). Each method has the same epochs, schedule and tuning budget: each of its hyperparameters
(rho for SAM-family methods, alpha for mixing methods) from a short list, two tuning runs per setting, the best
mean on validation kept; then `--seeds` runs at the chosen values. Ablations for BG-Mix and DG-Mix: gamma in
{0.25, 0.5, 0.75} and the flagging direction, on the CNN.

Each run's result is appended to the CSV as it finishes; a rerun skips what is already there.
"""
import argparse
import csv
import itertools
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'

COMMON = ['--dataset', 'digits', '--train-subset', '0.2', '-b', '16', '--warmup-epochs', '1', '--sched', 'cosine',
          '--workers', '0', '--smoothing', '0.1', '--hflip', '0', '--scale', '0.8', '1.0', '--color-jitter', '0']
# Per architecture: model and optimizer settings shared by every method (the same epochs and schedule).
ARCHS = {
    'cnn': dict(argv=['--model', 'resnet10t', '--img-size', '32', '--epochs', '20', '--lr', '0.05',
                      '--weight-decay', '5e-4'], base='sgd'),
    'vit': dict(argv=['--model', 'test_vit', '--img-size', '16', '--model-kwargs', 'img_size=16', 'patch_size=4',
                      'class_token=False', 'global_pool=avg', '--epochs', '30', '--lr', '2e-3',
                      '--weight-decay', '0.05'], base='adamw'),
}
ALPHAS = (0.2, 0.5, 1.0)
RHOS = (0.02, 0.05, 0.1)
ASAM_RHOS = (0.5, 1.0, 2.0)
GMIX_ALPHAS = (0.2, 1.0)
# method -> (fixed flags, {flag: values to tune}); `{base}` is the architecture's optimizer.
METHODS = {
    'ERM': (['--opt', '{base}'], {}),
    'Mixup': (['--opt', '{base}'], {'--mixup': ALPHAS}),
    'CutMix': (['--opt', '{base}'], {'--cutmix': ALPHAS}),
    'SAM': (['--opt', 'gmix_sam', '--sam-base', '{base}'], {'--rho': RHOS}),
    'ASAM': (['--opt', 'gmix_sam', '--sam-base', '{base}', '--asam'], {'--rho': ASAM_RHOS}),
    'G-Mix': (['--opt', 'gmix_sam', '--sam-base', '{base}', '--mixup-mode', 'g'], {'--rho': RHOS, '--mixup': GMIX_ALPHAS}),
    'BG-Mix': (['--opt', 'gmix_sam', '--sam-base', '{base}', '--mixup-mode', 'bg'], {'--rho': RHOS, '--mixup': GMIX_ALPHAS}),
    'DG-Mix': (['--opt', 'gmix_sam', '--sam-base', '{base}', '--mixup-mode', 'dg'], {'--rho': RHOS, '--mixup': GMIX_ALPHAS}),
}
ABLATIONS = [{'--gmix-ratio': g, '--gmix-flag': 'largest'} for g in (0.25, 0.75)] + \
            [{'--gmix-ratio': 0.5, '--gmix-flag': 'smallest'}]
TUNING_SEEDS = (101, 102)  # apart from the reported seeds 1..N
FIELDS = ['arch', 'method', 'phase', 'hparams', 'seed', 'split', 'top1', 'loss', 'seconds']


def run_key(arch, method, phase, hparams, seed):
    return arch, method, phase, json.dumps(hparams, sort_keys=True), str(seed)


def train_once(arch, method, phase, hparams, seed, split):
    """ One train.py run in this worker process; returns its CSV row. """
    import torch
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    sys.path.insert(0, str(ROOT))
    import train

    fixed, _ = METHODS[method]
    argv = [*COMMON, *ARCHS[arch]['argv'], *[a.format(base=ARCHS[arch]['base']) for a in fixed],
            *itertools.chain.from_iterable((k, str(v)) for k, v in hparams.items()),
            '--seed', str(seed), '--val-split', split]
    AcceleratorState._reset_state(True)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        train.main([*argv, '--output', out, '--experiment', 'run'])
        with open(Path(out) / 'run' / 'summary.csv') as f:
            last = list(csv.DictReader(f))[-1]
    return dict(zip(FIELDS, (*run_key(arch, method, phase, hparams, seed)[:4], seed, split,
                             float(last['eval_top1']), float(last['eval_loss']), round(time.time() - start, 1))))


class Runner:
    """ Runs jobs two at a time, appending each result to the CSV as it finishes. """

    def __init__(self, csv_path, workers):
        self.csv_path = Path(csv_path)
        self.workers = workers
        self.rows = []
        if self.csv_path.is_file():
            with open(self.csv_path) as f:
                self.rows = list(csv.DictReader(f))
        self.started = time.time()
        self.finished_here = 0

    def done(self, job):
        return any(run_key(r['arch'], r['method'], r['phase'], json.loads(r['hparams']), r['seed']) == run_key(*job[:5])
                   for r in self.rows)

    def run(self, jobs, total):
        """ Run the jobs not yet in the CSV; `total` is the number of runs of the whole benchmark. """
        jobs = [j for j in jobs if not self.done(j)]
        if not jobs:
            return
        with ProcessPoolExecutor(self.workers) as pool:
            for future in as_completed([pool.submit(train_once, *job) for job in jobs]):
                row = future.result()
                self.append(row)
                self.finished_here += 1
                left = total - len(self.rows)
                eta = (time.time() - self.started) / self.finished_here * left
                print(f'[{len(self.rows)} runs done, {left} to go, ~{eta / 60:.0f} min left] {row["arch"]} '
                      f'{row["method"]} {row["phase"]} {row["hparams"]} seed {row["seed"]}: '
                      f'{row["top1"]:.2f}% ({row["seconds"]}s)', flush=True)

    def append(self, row):
        self.rows.append({k: str(v) for k, v in row.items()})
        new = not self.csv_path.is_file()
        with open(self.csv_path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def grid(tuned):
    return [dict(zip(tuned, values)) for values in itertools.product(*tuned.values())]


def tuning_jobs():
    return [(arch, method, 'tune', hp, seed, 'validation') for arch in ARCHS for method, (_, tuned) in METHODS.items()
            for hp in grid(tuned) for seed in TUNING_SEEDS]


def chosen(rows, arch, method):
    """ The tuned hyperparameters with the best mean validation accuracy over the tuning seeds (first listed
    wins a tie). """
    accs = {}
    for r in rows:
        if r['arch'] == arch and r['method'] == method and r['phase'] == 'tune':
            accs.setdefault(r['hparams'], []).append(float(r['top1']))
    order = {json.dumps(hp, sort_keys=True): i for i, hp in enumerate(grid(METHODS[method][1]))}
    best = max(accs, key=lambda hp: (statistics.mean(accs[hp]), -order[hp]))
    return json.loads(best)


def final_jobs(rows, seeds):
    jobs = []
    for arch in ARCHS:
        for method in METHODS:
            hp = chosen(rows, arch, method)
            jobs += [(arch, method, 'final', hp, s, 'test') for s in seeds]
            if arch == 'cnn' and method in ('BG-Mix', 'DG-Mix'):
                jobs += [(arch, method, 'ablation', {**hp, **ab}, s, 'test') for ab in ABLATIONS for s in seeds]
    return jobs


def summarize(rows):
    """ (arch, method, phase, hparams) -> list of test accuracies. """
    groups = {}
    for r in rows:
        if r['phase'] != 'tune':
            groups.setdefault((r['arch'], r['method'], r['phase'], r['hparams']), []).append(float(r['top1']))
    return groups


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(rows, out_dir, command):
    groups = summarize(rows)
    lines = ['# Accuracy on the built-in digits, limited data', '',
             f'Reproduce: `{command}` (results: `accuracy_runs.csv`).', '',
             f'Common settings: `{" ".join(COMMON)}`; test accuracy (%) at the last epoch, mean and standard '
             f'deviation over seeds; hyperparameters chosen on the validation split.', '']
    for arch in ARCHS:
        lines += [f'## {arch}: `{" ".join(ARCHS[arch]["argv"])}`, base optimizer {ARCHS[arch]["base"]}', '',
                  '| method | test top-1 (mean ± std) | seeds | chosen on validation |', '| --- | ---: | ---: | --- |']
        for (a, method, phase, hp), accs in groups.items():
            if a == arch and phase == 'final':
                m, s = mean_std(accs)
                lines.append(f'| {method} | {m:.2f} ± {s:.2f} | {len(accs)} | {hp} |')
        lines.append('')
    ablation = [(k, v) for k, v in groups.items() if k[2] == 'ablation' or (k[2] == 'final' and k[1] in ('BG-Mix', 'DG-Mix') and k[0] == 'cnn')]
    if ablation:
        lines += ['## Ablation (cnn): gamma and flagging direction', '',
                  '| method | gamma | flag | test top-1 (mean ± std) | seeds |', '| --- | ---: | --- | ---: | ---: |']
        for (arch, method, phase, hp), accs in sorted(ablation, key=lambda kv: (kv[0][1], kv[0][3])):
            hp = json.loads(hp)
            m, s = mean_std(accs)
            lines.append(f'| {method} | {hp.get("--gmix-ratio", 0.5)} | {hp.get("--gmix-flag", "largest")} | '
                         f'{m:.2f} ± {s:.2f} | {len(accs)} |')
    (out_dir / 'accuracy.md').write_text('\n'.join(lines) + '\n')
    plot(groups, out_dir / 'accuracy.png')
    print('\n'.join(lines))


def plot(groups, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARCHS), figsize=(6 * len(ARCHS), 4), squeeze=False)
    for ax, arch in zip(axes[0], ARCHS):
        stats = [(method, *mean_std(accs)) for (a, method, phase, _), accs in groups.items()
                 if a == arch and phase == 'final']
        if not stats:
            continue
        names, means, stds = zip(*stats)
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color='tab:blue', alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_ylim(max(0, min(means) - 3 * max(max(stds), 1)), min(100, max(means) + 3 * max(max(stds), 1)))
        ax.set_ylabel('test top-1 (%)')
        ax.set_title(f'{arch} ({ARCHS[arch]["argv"][1]}), mean ± std over seeds')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', default=str(RESULTS))
    parser.add_argument('--report-only', action='store_true')
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(out_dir / 'accuracy_runs.csv', args.workers)
    seeds = list(range(1, args.seeds + 1))
    n_final = len(ARCHS) * len(METHODS) * len(seeds) + 2 * len(ABLATIONS) * len(seeds)
    tune = tuning_jobs()
    if not args.report_only:
        runner.run(tune, len(tune) + n_final)
        runner.run(final_jobs(runner.rows, seeds), len(tune) + n_final)
    report(runner.rows, out_dir, 'python benchmarks/accuracy.py' + (f' --seeds {args.seeds}' if args.seeds != 5 else ''))


if __name__ == '__main__':
    main()
