""" timm_gmix.sharpness against exact computations on a tiny float64 model: its full Hessian by autograd over
the flattened parameters, losses by functional_call written out here; the model left exactly as it was. """
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from timm_gmix import sharpness
from timm_gmix.training.args import parse_args
from timm_gmix.training.data import load_splits
from timm_gmix.training.errors import main_guard
from timm_gmix.training.export import export_model
from timm_gmix.training.loader import with_transforms


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # 43 parameters


def make_batches(sizes=(6, 4), features=4, classes=3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(n, features, generator=generator, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=generator)) for n in sizes]


class Flat:
    """ The model's loss as a function of its parameters flattened into one vector (all examples at once). """

    def __init__(self, model, batches):
        self.model, self.names = model, [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.x = torch.cat([x for x, _ in batches])
        self.y = torch.cat([y for _, y in batches])
        self.w = torch.cat([p.detach().flatten() for p in model.parameters()])

    def params(self, flat):
        sizes = [s.numel() for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(sizes), self.shapes)}

    def loss(self, flat):
        return F.cross_entropy(functional_call(self.model, self.params(flat), (self.x,)), self.y)

    def gradient(self):
        flat = self.w.clone().requires_grad_()
        return torch.autograd.grad(self.loss(flat), flat)[0]

    def hessian(self):
        return torch.autograd.functional.hessian(self.loss, self.w)


@pytest.fixture
def mlp():
    model, batches = make_mlp(), make_batches()
    return model, batches, Flat(model, batches)


def test_top_eigenvalue_is_the_full_hessians(mlp):
    model, batches, flat = mlp
    eigenvalues = torch.linalg.eigvalsh(flat.hessian())
    by_magnitude = eigenvalues[eigenvalues.abs().argsort(descending=True)]
    assert by_magnitude[0] > 0 and by_magnitude[1].abs() < 0.9 * by_magnitude[0]  # a setup power iteration resolves
    top = sharpness.top_hessian_eigenvalue(model, batches, iters=1000, tol=0.0)
    assert top == pytest.approx(by_magnitude[0].item(), rel=1e-6)


def test_hutchinson_trace(mlp):
    model, batches, flat = mlp
    hessian = flat.hessian()
    generator = torch.Generator().manual_seed(3)
    quadratic_forms = []
    for _ in range(5):  # the estimator's Rademacher vectors: per sample, per parameter tensor in order
        v = torch.cat([torch.randint(0, 2, p.shape, generator=generator).flatten() * 2 - 1
                       for p in model.parameters()]).double()
        quadratic_forms.append(v @ hessian @ v)
    assert sharpness.hessian_trace(model, batches, samples=5, seed=3) == pytest.approx(
        torch.stack(quadratic_forms).mean().item(), rel=1e-12)

    samples = 2000
    # Var(v^T H v) = 2 (||H||_F^2 - sum H_ii^2) for Rademacher v
    std = (2 * ((hessian ** 2).sum() - (hessian.diag() ** 2).sum()) / samples).sqrt().item()
    estimate = sharpness.hessian_trace(model, batches, samples=samples)
    assert abs(estimate - torch.trace(hessian).item()) < 4 * std


@pytest.mark.parametrize('adaptive', [False, True])
def test_one_ascent_step_is_the_sam_perturbation(mlp, adaptive):
    model, batches, flat = mlp
    rho, g = 0.05, flat.gradient()
    scale = flat.w.abs() if adaptive else torch.ones_like(flat.w)
    e = rho * scale ** 2 * g / (scale * g).norm()  # SAM: rho g / ||g||; ASAM: rho |w|^2 g / || |w| g ||
    expected = (flat.loss(flat.w + e) - flat.loss(flat.w)).item()
    one_step = sharpness.worst_case_sharpness(model, batches, rho, steps=1, adaptive=adaptive)
    assert one_step == pytest.approx(expected, rel=1e-10)
    assert sharpness.worst_case_sharpness(model, batches, rho, steps=5, adaptive=adaptive) >= one_step


def test_worst_case_stays_within_the_second_order_bound(mlp):
    """ max over ||e|| <= rho of L(w + e) - L(w) <= rho ||g|| + rho^2 / 2 max|lambda| + O(rho^3). """
    model, batches, flat = mlp
    rho = 1e-3
    top = torch.linalg.eigvalsh(flat.hessian()).abs().max().item()
    bound = rho * flat.gradient().norm().item() + rho ** 2 / 2 * top
    assert sharpness.worst_case_sharpness(model, batches, rho, steps=10) <= bound * (1 + 1e-4)


def test_average_case_is_the_mean_over_the_same_gaussian_draws(mlp):
    model, batches, flat = mlp
    hessian = flat.hessian()
    generator = torch.Generator().manual_seed(4)
    draws = [torch.cat([torch.randn(p.shape, generator=generator, dtype=p.dtype).flatten()
                        for p in model.parameters()]) for _ in range(8)]
    sigma = 0.02
    expected = torch.stack([(flat.loss(flat.w + sigma * e) + flat.loss(flat.w - sigma * e)) / 2
                            for e in draws]).mean() - flat.loss(flat.w)
    assert sharpness.average_case_sharpness(model, batches, sigma, samples=8, seed=4) == pytest.approx(
        expected.item(), rel=1e-10)

    # sigma -> 0: the second-order term, sigma^2 / 2 e^T H e, averaged over the same draws
    sigma = 1e-4
    quadratic = sigma ** 2 / 2 * torch.stack([e @ hessian @ e for e in draws]).mean().item()
    assert sharpness.average_case_sharpness(model, batches, sigma, samples=8, seed=4) == pytest.approx(
        quadratic, rel=1e-3)


def test_loss_curve_along_a_filter_normalized_direction(mlp):
    model, batches, flat = mlp
    alphas = [-1.0, -0.25, 0.0, 0.5, 1.0]
    curve = sharpness.loss_curve(model, batches, alphas, seed=5)
    with torch.no_grad():
        loss_here = sum(F.cross_entropy(model(x), y, reduction='sum') for x, y in batches) / 10
    assert curve[2] == loss_here.item()

    weights = {n: p.detach() for n, p in model.named_parameters()}
    direction = sharpness.filter_normalized_direction(weights, torch.Generator().manual_seed(5))
    for name, w in weights.items():
        if w.dim() == 1:
            assert torch.equal(direction[name], torch.zeros_like(w))
        else:
            torch.testing.assert_close(direction[name].norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
    d = torch.cat([direction[n].flatten() for n in flat.names])
    expected = [flat.loss(flat.w + a * d).item() for a in alphas]
    assert curve == pytest.approx(expected, rel=1e-12)


def make_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double()
    with torch.no_grad():  # statistics unlike a batch's, so that train-mode BatchNorm would change the loss
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model[3].eval()  # mixed modes, each to be restored
    return model


CNN_MEASURES = {
    'eigenvalue': lambda m, b: sharpness.top_hessian_eigenvalue(m, b, iters=3),
    'trace': lambda m, b: sharpness.hessian_trace(m, b, samples=2),
    'worst': lambda m, b: sharpness.worst_case_sharpness(m, b, 0.1, steps=2),
    'adaptive': lambda m, b: sharpness.worst_case_sharpness(m, b, 0.5, steps=2, adaptive=True),
    'average': lambda m, b: sharpness.average_case_sharpness(m, b, 0.05, samples=2),
    'curve': lambda m, b: sharpness.loss_curve(m, b, [-0.5, 0.0, 0.5]),
    'measure': lambda m, b: sharpness.measure(m, b, iters=2, trace_samples=1, steps=1, noise_samples=1),
}


@pytest.mark.parametrize('name', CNN_MEASURES)
def test_model_left_exactly_as_it_was_and_measured_in_eval_mode(name):
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 2, 5, 5, generator=generator, dtype=torch.float64),
                torch.randint(0, 4, (5,), generator=generator)) for _ in range(2)]
    model = make_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    first = CNN_MEASURES[name](model, batches)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert CNN_MEASURES[name](model, batches) == first  # deterministic
    reference = make_cnn().eval()  # the same weights, evaluated in eval mode throughout
    assert CNN_MEASURES[name](reference, batches) == first


def test_seed_chooses_the_random_vectors(mlp):
    model, batches, _ = mlp
    for measure in (lambda seed: sharpness.top_hessian_eigenvalue(model, batches, iters=2, seed=seed),
                    lambda seed: sharpness.hessian_trace(model, batches, samples=2, seed=seed),
                    lambda seed: sharpness.average_case_sharpness(model, batches, 0.1, samples=2, seed=seed),
                    lambda seed: sharpness.loss_curve(model, batches, [0.5], seed=seed)):
        assert measure(0) == measure(0) != measure(1)


DATA_CONFIG = {'input_size': (3, 16, 16), 'interpolation': 'bilinear', 'mean': (0.5, 0.5, 0.5),
               'std': (0.25, 0.25, 0.25), 'crop_pct': 1.0, 'crop_mode': 'center'}
CARD = {'dataset': 'digits', 'num_train': 1, 'num_val': 1, 'final': None, 'epochs_trained': 0}


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=10, img_size=16, patch_size=4)
    return export_model(model, tmp_path / 'run' / 'model', parse_args(['--model', 'test_vit']), DATA_CONFIG, CARD)


def test_command_measures_an_exported_model(exported, tmp_path):
    out = tmp_path / 'measured'
    record = sharpness.main(['--model', f'local-dir:{exported}', '--dataset', 'digits', '--split', 'test',
                             '--num-examples', '7', '-b', '4', '--rho', '0.1', '--seed', '3', '--out', str(out)])
    assert json.loads((out / 'sharpness.json').read_text()) == json.loads(json.dumps(record))
    assert (out / 'loss_curve.png').read_bytes().startswith(b'\x89PNG')

    # the same numbers from the library, on the first 7 test digits through the model's eval transform
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    args = parse_args(['--dataset', 'digits', '--val-split', 'test', '--no-prefetcher'])  # float, normalized
    train, test, _ = load_splits(args)
    _, dataset, data_config = with_transforms(train, test.select(range(7)), args, model)
    assert data_config['input_size'] == (3, 16, 16)
    examples = [dataset[i] for i in range(7)]
    batches = [(torch.stack([x for x, _ in part]), torch.tensor([y for _, y in part]))
               for part in (examples[:4], examples[4:])]
    expected = sharpness.measure(model, batches, rho=0.1, seed=3)
    assert {k: record[k] for k in expected} == expected
    assert record['num_examples'] == 7 and record['split'] == 'test' and record['settings']['rho'] == 0.1


@pytest.mark.parametrize('argv, message', [
    (['--model', 'local-dir:{tmp}/nowhere'], 'error: --model local-dir:{tmp}/nowhere: no config.json in '
                                             '{tmp}/nowhere; give the model/ folder that train.py exports '
                                             '(local-dir:OUTPUT/EXP/model)\n'),
    (['--model', 'local-dir:{model}', '--dataset', 'nodata'], "error: unknown --dataset 'nodata': use an image "
                                                              "folder (train.py DIR), hfds/<Hub name or folder>, "
                                                              "torch/<name>, a folder with the data, or digits\n"),
])
def test_bad_input_is_one_line(exported, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, model=exported) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: sharpness.main([*argv, '--out', str(tmp_path / 'out')]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message.format(tmp=tmp_path)
    assert not (tmp_path / 'out').exists()


def test_benchmark_measures_each_kept_run_once(tmp_path, monkeypatch):
    """ benchmarks/sharpness.py on kept runs: the CSV row holds the library's numbers on the run's first training
    examples, `--seeds 1` leaves seed 2 for a later run, a rerun measures nothing again, and the runs of another
    suite's arms (the digits' `vit`) are left to `--suite digits`. """
    benchmarks = Path(__file__).resolve().parents[1] / 'benchmarks'
    monkeypatch.syspath_prepend(str(benchmarks))  # as when it runs as a script: its sibling modules
    spec = importlib.util.spec_from_file_location('sharpness_benchmark', benchmarks / 'sharpness.py')
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # so that its worker processes find measure_run
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, 'SETTINGS', {**bench.SETTINGS, 'iters': 2, 'trace_samples': 1, 'noise_samples': 1})

    run_dir = tmp_path / 'cache' / 'fmnist-vit' / 'g-mix' / 'seed1'
    argv = ['--dataset', 'digits', '--model', 'test_vit', '--train-subset', '0.2', '--seed', '1']
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=10, img_size=16, patch_size=4)
    export_model(model, run_dir / 'model', parse_args(argv), DATA_CONFIG, CARD)
    (run_dir / 'run.json').write_text(json.dumps({'arch': 'fmnist-vit', 'method': 'G-Mix', 'seed': 1,
                                                  'argv': argv, 'hparams': {'--rho': 0.05}, 'test_top1': 87.5}))
    shutil.copytree(run_dir, run_dir.with_name('seed2'))
    digits_run = tmp_path / 'cache' / 'vit' / 'g-mix' / 'seed1'
    shutil.copytree(run_dir, digits_run)
    (digits_run / 'run.json').write_text((run_dir / 'run.json').read_text().replace('fmnist-vit', 'vit'))
    out = tmp_path / 'results'
    cli = ['--cache', str(tmp_path / 'cache'), '--out', str(out), '--workers', '1', '--num-examples', '5']
    bench.main([*cli, '--seeds', '1'])
    (row,) = bench.RunsCSV(out / 'sharpness_runs.csv', bench.FIELDS).rows

    model = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True)
    args = parse_args([*argv, '--no-prefetcher'])
    train, _, _ = load_splits(args)
    _, dataset, _ = with_transforms(train, train.select(range(5)), args, model)
    batches = [(torch.stack([dataset[i][0] for i in range(5)]), torch.tensor([dataset[i][1] for i in range(5)]))]
    expected = sharpness.measure(model, batches, **bench.SETTINGS)
    assert {k: float(row[k]) for k in bench.MEASURES} == {k: expected[k] for k in bench.MEASURES}
    assert json.loads(row['loss_curve']) == expected['loss_curve']
    assert (row['run'], row['arch'], row['method'], row['seed'], row['test_top1'], row['num_examples']) == (
        'fmnist-vit/g-mix/seed1', 'fmnist-vit', 'G-Mix', '1', '87.5', '5')
    assert sorted(p.name for p in out.iterdir()) == ['sharpness.md', 'sharpness_curves.png', 'sharpness_runs.csv',
                                                     'sharpness_scatter.png']

    bench.main(cli)  # seed 2 now: the same model and examples, so the same numbers
    rows = bench.RunsCSV(out / 'sharpness_runs.csv', bench.FIELDS).rows
    assert rows[0] == row and {**rows[1], 'run': row['run'], 'seconds': row['seconds']} == row
    assert rows[1]['run'] == 'fmnist-vit/g-mix/seed2'
    bench.main(cli)  # nothing left to measure
    assert bench.RunsCSV(out / 'sharpness_runs.csv', bench.FIELDS).rows == rows
    bench.main([*cli, '--suite', 'digits'])
    (digits,) = bench.RunsCSV(out / 'sharpness_digits_runs.csv', bench.FIELDS).rows
    assert (digits['run'], digits['arch']) == ('vit/g-mix/seed1', 'vit')
    assert (out / 'sharpness_digits.md').is_file()
