""" Helpers shared by the tests: train.py's small runs, the two-process CPU launch through Accelerate,
reading what a run leaves on disk, and the check that bad input is one clear line. """
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / 'tests' / 'scripts'

# A small, fast train.py run: a tenth of the digits (108 images), a small timm CNN with BatchNorm.
SMALL_RUN = ['--model', 'resnet10t', '--img-size', '32', '--train-subset', '0.1', '-b', '16', '--workers', '0']
DG_MIX = ['--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    # One thread per process: the tests share two cores with other work.
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def run_train_py(output, *argv, timeout=600, preexec_fn=None, **env) -> subprocess.CompletedProcess:
    """ train.py in its own process, as a user runs it; `env` adds environment variables, `preexec_fn` runs in
    the child before train.py (resource limits). """
    cmd = [sys.executable, str(ROOT / 'train.py'), *map(str, argv), '--output', str(output)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**subprocess_env(), **env}, preexec_fn=preexec_fn)


def descendants(pid: int) -> list:
    """ Every process below `pid`, from /proc. """
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def accelerate_launch(*script_and_args, mixed_precision='no', timeout=300, kill_when=None) -> subprocess.CompletedProcess:
    """ Two CPU processes through Accelerate (gloo). Without ACCELERATE_USE_CPU=1 this would silently
    run two separate single-process jobs. `kill_when()`, polled, kills the launcher and its processes with
    SIGKILL once it returns True (as a machine failure would). """
    cmd = [sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', '--multi_gpu',
           '--num_processes', '2', '--num_machines', '1', '--mixed_precision', mixed_precision,
           '--dynamo_backend', 'no', '--main_process_port', str(free_port()), *map(str, script_and_args)]
    env = {**subprocess_env(), 'ACCELERATE_USE_CPU': '1'}
    if kill_when is None:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:  # pipes could fill and block
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
        deadline = time.time() + timeout
        while proc.poll() is None and not kill_when() and time.time() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:  # torch's launcher starts its workers in new sessions
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def train_module():
    """ The train.py module (for monkeypatching what it calls). """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train
    return train


def train_main(argv):
    """ train.main(argv) in this process, with Accelerate's process-wide state fresh before and after. """
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    try:
        return train_module().main(list(map(str, argv)))
    finally:
        AcceleratorState._reset_state(True)


class Interrupted(Exception):
    """ Stands in for the process being killed at that point. """


def stopped_and_resumed(argv, output, monkeypatch, position=(1, 4)):
    """ (uninterrupted run folder, resumed run folder): train.py `argv` run whole in OUTPUT/whole, and in
    OUTPUT/cut stopped right after its recovery point at `position` (epoch, updates) was saved, then resumed with
    the same command. The caller compares the two. """
    train_main([*argv, '--output', output, '--experiment', 'whole'])
    train = train_module()
    save = train.save_state

    def save_then_stop(accelerator, path, meta):
        saved = save(accelerator, path, meta)
        if Path(path).name == 'recovery' and tuple(meta['position']) == tuple(position):
            raise Interrupted(f'stopped after saving the recovery point at {position}')
        return saved

    import pytest
    with monkeypatch.context() as patch:
        patch.setattr(train, 'save_state', save_then_stop)
        with pytest.raises(Interrupted):
            train_main([*argv, '--output', output, '--experiment', 'cut'])
    train_main([*argv, '--resume', Path(output) / 'cut'])
    return Path(output) / 'whole', Path(output) / 'cut'


def assert_bad_input(capsys, tmp_path, argv, *expected):
    """ train.py exits with status 2 and one line naming the problem (`expected` words), before training. """
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        train = train_module()
        train.main_guard(lambda: train.main([*map(str, argv), '--output', str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    for word in expected:
        assert word in err, err
    assert not any(tmp_path.rglob('summary.csv')), 'training started'


def read_summary(run_dir) -> list:
    with open(Path(run_dir) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def assert_same(a, b, where='state'):
    """ Nested dicts/lists/tuples of tensors and plain values are exactly equal (tensors bit for bit). """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f'{where}: keys {sorted(a)} != {sorted(b)}'
        for key in a:
            assert_same(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'
