""" Flatness benchmark: how flat are the minima that each method of the accuracy benchmark reaches?

    python benchmarks/sharpness.py                 # after benchmarks/accuracy.py; stop and rerun to continue
    python benchmarks/sharpness.py --report-only   # rebuild the table and plots from the CSV
    python benchmarks/sharpness.py --suite digits  # the previous benchmark's digits models

Every final model that benchmarks/accuracy.py keeps (benchmarks/cache/accuracy/<arch>/<method>/seed<k>/, a
train.py export in model/ and its run.json: arch, method, seed, hparams, argv, test_top1) is measured with
timm_gmix.sharpness on the first --num-examples examples of that run's own training data (its argv read by
train.py's parser and data code, --train-subset included, through the model's eval transform; the same
examples for every run of an architecture): the top Hessian eigenvalue, the Hessian trace, worst-case sharpness
(SAM's ball, radius RHO; ASAM's |w|-scaled ball, radius ADAPTIVE_RHO), average-case sharpness (Gaussian weight
noise, SIGMA) and the loss along one filter-normalized random direction (the same seed for every model).

The iteration counts in SETTINGS are small, so that a model takes seconds on one thread: resnet10t at 32x32 on
128 examples about 20 s (data 2.5 s; a Hessian-vector product about 1 s, so at most 10 s for the eigenvalue, a
power iteration of at most 10 steps stopped at 1% change, and 4 s for the trace, a 4-vector Hutchinson estimate;
the rest 3.5 s); the benchmark's test_vit (2 blocks, 32x32) about 5 s on 64 examples. The eigenvalue and trace are
estimates, compared across methods under the same settings, examples and seeds.

Each run's numbers are appended to sharpness_runs.csv (--suite digits: sharpness_digits_runs.csv) as they come; a
rerun skips the runs already there. Writes sharpness.md (sharpness_digits.md; mean ± std over seeds per architecture and method, with test accuracy and the rank
correlation of each measure with test accuracy over runs), sharpness_curves.png and sharpness_scatter.png (with
_digits before the extension for the digits).
"""
import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from scipy.stats import spearmanr

from accuracy import ARCHS, METHODS
from runs_csv import RunsCSV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
CACHE = ROOT / 'benchmarks' / 'cache' / 'accuracy'

SETTINGS = dict(rho=0.05, adaptive_rho=0.5, sigma=0.01, iters=10, tol=1e-2, trace_samples=4, steps=3,
                noise_samples=4, alphas=tuple(a / 5 for a in range(-5, 6)), seed=0)
BATCH_SIZE = 128
MEASURES = {  # CSV column: label in the table and plots
    'top_hessian_eigenvalue': 'top eigenvalue', 'hessian_trace': 'trace', 'worst_case_sharpness': 'worst case',
    'adaptive_worst_case_sharpness': 'adaptive worst case', 'average_case_sharpness': 'average case', 'loss': 'loss'}
FIELDS = ['run', 'arch', 'method', 'seed', 'hparams', 'test_top1', *MEASURES, 'loss_curve', 'num_examples', 'seconds']


def find_runs(cache: Path, suite: str) -> list:
    """ The run folders of the suite's arms under `cache` (each holding run.json and model/), in sorted order. """
    return sorted(p.parent for p in cache.glob('*/*/*/run.json') if (p.parent / 'model').is_dir()
                  and ARCHS.get(p.parents[2].name, {}).get('suite') == suite)


def measure_run(run_dir: Path, cache: Path, num_examples: int, settings: dict) -> dict:
    """ One run's CSV row, measured with `settings` (measure's arguments) in this worker process on one thread. """
    import torch
    torch.set_num_threads(1)
    from timm_gmix.sharpness import eval_batches, load_model, measure

    start = time.time()
    run = json.loads((run_dir / 'run.json').read_text())
    model = load_model(f'local-dir:{run_dir / "model"}')
    batches = eval_batches(model, run['argv'], training=True, num_examples=num_examples, batch_size=BATCH_SIZE)
    numbers = measure(model, batches, **settings)
    return {'run': run_dir.relative_to(cache).as_posix(), 'arch': run['arch'], 'method': run['method'],
            'seed': run['seed'], 'hparams': json.dumps(run['hparams'], sort_keys=True), 'test_top1': run['test_top1'],
            **{k: numbers[k] for k in MEASURES}, 'loss_curve': json.dumps(numbers['loss_curve']),
            'num_examples': sum(len(y) for _, y in batches), 'seconds': round(time.time() - start, 1)}


def measure_all(cache: Path, suite: str, runs: RunsCSV, workers: int, num_examples: int, settings: dict,
                seeds=None):
    """ Measure every run under `cache` (of seeds 1..`seeds`, if given) not yet in `runs`, appending each row as it
    finishes. """
    done = {r['run'] for r in runs.rows}
    todo = [r for r in find_runs(cache, suite) if r.relative_to(cache).as_posix() not in done
            and (seeds is None or int(r.name.removeprefix('seed')) <= seeds)]
    print(f'{len(done)} runs already measured, {len(todo)} to go', flush=True)
    for i, row in enumerate(measured(todo, cache, workers, num_examples, settings), 1):
        runs.append(row)
        print(f'[{i}/{len(todo)}] {row["run"]}: top eigenvalue {row["top_hessian_eigenvalue"]:.3g}, trace '
              f'{row["hessian_trace"]:.3g} ({row["seconds"]}s)', flush=True)


def measured(todo, cache: Path, workers: int, num_examples: int, settings: dict):
    """ measure_run of each run, as they finish: in this process with one worker, else in spawned processes
    (forking a process that has run autograd is unsafe). """
    if workers == 1:
        yield from (measure_run(run, cache, num_examples, settings) for run in todo)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = [pool.submit(measure_run, run, cache, num_examples, settings) for run in todo]
        yield from (future.result() for future in as_completed(futures))


def _method_key(method: str):
    order = list(METHODS)
    return (order.index(method), '') if method in order else (len(order), method)


def groups_of(rows) -> dict:
    """ {arch: {method: [rows]}}, methods in the accuracy benchmark's order (others after, by name). """
    groups = {}
    for r in rows:
        groups.setdefault(r['arch'], {}).setdefault(r['method'], []).append(r)
    return {arch: dict(sorted(methods.items(), key=lambda kv: _method_key(kv[0]))) for arch, methods in groups.items()}


def mean_std(values) -> str:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.4g} ± {std:.2g}'


def spearman(x, y) -> float:
    """ Spearman's rank correlation (NaN, with scipy's warning, when either side is constant). """
    return float(spearmanr(x, y).statistic)


def report(rows, out_dir: Path, command: str, tag: str):
    lines = ['# Flatness of the accuracy benchmark\'s final models', '',
             f'Reproduce: `{command}` (results: `sharpness{tag}_runs.csv`).', '',
             f'Measured with `timm_gmix.sharpness` on the first {rows[0]["num_examples"] if rows else "?"} training '
             f'examples of each run (eval transform), batch {BATCH_SIZE}, settings `{json.dumps(SETTINGS)}`. '
             f'Mean ± standard deviation over seeds; test top-1 (%) from the accuracy benchmark. Lower is '
             f'flatter.', '']
    header = ['method', 'seeds', 'test top-1', *MEASURES.values()]
    for arch, methods in groups_of(rows).items():
        lines += [f'## {arch}', '', '| ' + ' | '.join(header) + ' |', '| --- |' + ' ---: |' * (len(header) - 1)]
        for method, runs in methods.items():
            cells = [method, str(len(runs)), mean_std(r['test_top1'] for r in runs),
                     *(mean_std(r[k] for r in runs) for k in MEASURES)]
            lines.append('| ' + ' | '.join(cells) + ' |')
        runs = [r for rs in methods.values() for r in rs]
        accuracy = [float(r['test_top1']) for r in runs]
        correlations = ', '.join(f'{label} {spearman([float(r[k]) for r in runs], accuracy):+.2f}'
                                 for k, label in MEASURES.items())
        lines += ['', f'Spearman rank correlation with test top-1 over all {len(runs)} runs: {correlations} '
                      f'(negative: flatter runs were more accurate).', '']
    (out_dir / f'sharpness{tag}.md').write_text('\n'.join(lines) + '\n')
    plot_curves(rows, out_dir / f'sharpness{tag}_curves.png')
    plot_scatter(rows, out_dir / f'sharpness{tag}_scatter.png')
    print('\n'.join(lines))


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows, path: Path):
    """ The mean 1-D loss curve per method over seeds, overlaid; one panel per architecture. """
    plt = _pyplot()
    groups = groups_of(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.6), squeeze=False)
    for ax, (arch, methods) in zip(axes[0], groups.items()):
        for method, runs in methods.items():
            curves = [json.loads(r['loss_curve']) for r in runs]
            ax.plot(SETTINGS['alphas'], [statistics.mean(c) for c in zip(*curves)], label=method,
                    color=plt.cm.tab20(_method_key(method)[0] % 20))  # one colour per method, as in the Pareto plot
        ax.set(title=f'{arch}: loss along a filter-normalized direction', xlabel='alpha', ylabel='training loss')
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=6, fontsize='small')
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(rows, path: Path):
    """ Test accuracy against each sharpness measure, every run a point coloured by method; one row per
    architecture. """
    plt = _pyplot()
    groups = groups_of(rows)
    measures = [k for k in MEASURES if k != 'loss']
    fig, axes = plt.subplots(len(groups), len(measures), figsize=(3.6 * len(measures), 3.2 * len(groups)),
                             squeeze=False)
    for row_axes, (arch, methods) in zip(axes, groups.items()):
        for ax, key in zip(row_axes, measures):
            for method, runs in methods.items():
                ax.scatter([float(r[key]) for r in runs], [float(r['test_top1']) for r in runs], label=method, s=14,
                           color=plt.cm.tab20(_method_key(method)[0] % 20))
            ax.set(title=f'{arch}', xlabel=MEASURES[key], ylabel='test top-1 (%)')
        row_axes[0].legend(fontsize='x-small')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--suite', default='fashion_mnist', choices=('fashion_mnist', 'digits'))
    parser.add_argument('--cache', default=str(CACHE), help='the accuracy benchmark\'s kept runs')
    parser.add_argument('--out', default=str(RESULTS), help='folder of sharpness_runs.csv and the report')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--num-examples', type=int, default=128, help='training examples measured on, per run')
    parser.add_argument('--seeds', type=int, help='measure only the runs of seeds 1..N (default: all)')
    parser.add_argument('--report-only', action='store_true')
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = '' if args.suite == 'fashion_mnist' else f'_{args.suite}'
    runs = RunsCSV(out_dir / f'sharpness{tag}_runs.csv', FIELDS)
    if not args.report_only:
        measure_all(Path(args.cache), args.suite, runs, args.workers, args.num_examples, SETTINGS, args.seeds)
    rows = runs.rows
    if not rows:
        sys.exit(f'error: no measured runs in {runs.path}: run benchmarks/accuracy.py first (it keeps its final '
                 f'models in {args.cache}), then this without --report-only')
    report(rows, out_dir, 'python benchmarks/sharpness.py' + (f' --suite {args.suite}' if tag else '') + (
        f' --num-examples {args.num_examples}' if args.num_examples != 128 else '') + (
        f' --seeds {args.seeds}' if args.seeds else ''), tag)


if __name__ == '__main__':
    main()
