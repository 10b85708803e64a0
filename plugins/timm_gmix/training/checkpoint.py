""" Run folders and checkpoints, kept as timm keeps them, written so that no run ever loses another's work.

One run, one folder `OUTPUT/EXPERIMENT/` (a new run never reuses a folder; a second process is locked out):

    args.yaml, summary.csv
    last/                   training state after the latest validated epoch
    checkpoint-<epoch>/     the --checkpoint-hist best epochs by --eval-metric (full training states)
    recovery/               mid-epoch training state, every --recovery-interval updates
    model_best.safetensors  weights of the best epoch, for timm.models.load_checkpoint (validate.py --checkpoint)
    model_best/             the best model, for timm.create_model('local-dir:...', pretrained=True)
    model/                  the final model

A training state is Accelerate's `save_state` (weights as safetensors, optimizer, scheduler, scaler, RNG
states and the registered objects) plus `checkpoint.json`: where in training it was taken, what it was
trained with, and every file with its size. It is written under a temporary name, verified (every file
there, every weight finite) and only then renamed over the previous one.
"""
import datetime
import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..step import all_finite as finite_on
from .errors import UsageError, reason

MANIFEST = 'checkpoint.json'
LAST, RECOVERY = 'last', 'recovery'
_BEST = re.compile(r'^checkpoint-(\d+)$')
# What a resumed run must share with the checkpoint to continue it, with the flag that sets each.
RESUME_KEYS = {'model': '--model', 'num_classes': '--num-classes', 'opt': '--opt', 'sam_base': '--sam-base',
               'num_processes': 'accelerate launch --num_processes'}


# ----------------------------------------------------------------------------------------------
# Run folders


def new_run_dir(output: str, experiment: str, default_name: str) -> Path:
    """ A fresh folder for a new run: OUTPUT/EXPERIMENT, or OUTPUT/<date-time>-<default_name> (timm's naming,
    with -1, -2, ... when two runs start in the same second). An EXPERIMENT that holds a run is refused. """
    output = Path(output or 'output/train')
    output.mkdir(parents=True, exist_ok=True)
    if experiment:
        run_dir = output / experiment
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f'{run_dir} already holds a run: continue it with --resume {run_dir}, or choose '
                             f'another --experiment (nothing in it was changed)')
        run_dir.mkdir(exist_ok=True)
        return run_dir
    name = f'{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}-{default_name}'
    for suffix in ['', *(f'-{i}' for i in range(1, 1000))]:
        try:
            (output / f'{name}{suffix}').mkdir()
            return output / f'{name}{suffix}'
        except FileExistsError:
            continue
    raise UsageError(f'could not make a new run folder in {output}: pass --experiment NAME')


class RunLock:
    """ An exclusive lock on a run folder for as long as this process trains in it. The kernel drops it when
    the process ends, however it ends, so a crashed run never leaves a stale lock. """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / '.lock'
        self.file = open(self.path, 'a+')
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or 'another process'
            self.file.close()
            raise UsageError(f'{run_dir} is in use by {owner}: wait for that run to end, or start a new run '
                             f'(without --experiment, or with another name)') from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'process {os.getpid()}')
        self.file.flush()

    def release(self):
        self.file.close()


# ----------------------------------------------------------------------------------------------
# Training states


def replace_dir(tmp: Path, final: Path):
    """ Rename `tmp` to `final`; an existing `final` is removed only after `tmp` is complete. """
    if final.exists():
        old = final.with_name(final.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _link_tree(source: Path, target: Path):
    """ A copy of a checkpoint folder made of hard links (no second copy on disk), written then renamed. """
    tmp = target.with_name(target.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=os.link)
    replace_dir(tmp, target)


def all_finite(tensors) -> bool:
    """ Whether every floating-point element of `tensors` (on any devices; other values are left out) is finite:
    the step's check, one host read per device. """
    tensors = [t for t in tensors if torch.is_tensor(t)]
    return all(bool(finite_on(tensors, device)) for device in {t.device for t in tensors})


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f'checkpoint {folder} is incomplete ({MANIFEST} is missing or unreadable: {reason(e)}): '
                         f'resume from another checkpoint of the run') from e


def _verify(folder: Path, manifest: dict) -> str:
    """ '' if every file of the manifest is there with its size and every saved weight is finite, else why not. """
    for name, size in manifest['files'].items():
        path = folder / name
        if not path.is_file():
            return f'{name} is missing'
        if path.stat().st_size != size:
            return f'{name} has {path.stat().st_size} bytes, not the {size} it was saved with'
    weights = folder / 'model.safetensors'
    try:
        with safe_open(str(weights), 'pt') as f:
            if not all_finite(f.get_tensor(k) for k in f.keys()):
                return 'its weights are not all finite'
    except Exception as e:  # safetensors raises its own kinds for a damaged file
        return f'model.safetensors cannot be read ({reason(e)})'
    return ''


def save_state(accelerator, folder, meta: dict) -> Path:
    """ Accelerate's full training state in `folder`, with its manifest, verified before it replaces what was
    there. Every process calls it. """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + '.tmp')
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {**meta, 'num_processes': accelerator.num_processes, 'files': files}
        problem = _verify(tmp, manifest)
        if problem:
            raise SystemExit(f'error: the checkpoint written to {tmp} failed verification ({problem}); '
                             f'{folder} was left as it was')
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, folder)
    accelerator.wait_for_everyone()
    return folder


def newest_state(run_dir) -> Path:
    """ The state a run continues from: the later of last/ and recovery/ (None if it has neither). A folder
    without its manifest is refused: a newer state may be the one that is damaged. A process killed between
    the two renames of `replace_dir` left the new state complete and verified under .tmp: it is put in place. """
    for name in (LAST, RECOVERY):
        final = Path(run_dir) / name
        tmp, old = final.with_name(name + '.tmp'), final.with_name(name + '.old')
        if not final.exists() and old.is_dir() and (tmp / MANIFEST).is_file():
            os.replace(tmp, final)
            shutil.rmtree(old)
    found = [p for p in (Path(run_dir) / LAST, Path(run_dir) / RECOVERY) if p.is_dir()]
    return max(found, key=lambda p: tuple(read_manifest(p)['position'])) if found else None


def resolve_resume(path):
    """ (state folder, its run folder, whether it is the run's newest state) for --resume PATH: a run folder
    (its newest state) or one of its state folders. """
    path = Path(path)
    if path.is_dir() and (path / 'args.yaml').is_file():
        state = newest_state(path)
        if state is None:
            raise UsageError(f'the run in {path} has no checkpoint yet: start it again without --resume')
        return state, path, True
    if not path.is_dir() or not (path / 'model.safetensors').is_file():
        raise UsageError(f'no checkpoint at {path}: pass a run folder, or one of its last/, recovery/ or '
                         f'checkpoint-<epoch>/ folders')
    return path, path.parent, newest_state(path.parent) == path


def load_state(accelerator, folder, expected: dict):
    """ Restore what `save_state` saved, after checking the manifest: every file there with its size, and the
    same model, classes, optimizer and number of processes (`expected`, keys of RESUME_KEYS). """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problem = _verify(folder, manifest)
    if problem:
        raise UsageError(f'checkpoint {folder} is incomplete or damaged ({problem}): resume from another '
                         f'checkpoint of the run')
    expected = {**expected, 'num_processes': accelerator.num_processes}
    for key, flag in RESUME_KEYS.items():
        if key in manifest and manifest[key] != expected[key]:
            raise UsageError(f'checkpoint {folder} was trained with {flag} {manifest[key]}, not {expected[key]}: '
                             f'resume with the same {flag}, or start a new run')
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # torch, safetensors and pickle each raise their own kind
        raise UsageError(f'checkpoint {folder} is corrupt ({reason(e)}): resume from another checkpoint of '
                         f'the run or start a new run') from e
    return manifest


def copy_run(source: Path, target: Path):
    """ Start a new run folder from an older checkpoint of `source` with its args and summary (the caller
    trims the summary to the checkpoint), so that the source run stays as it was. """
    for name in ('args.yaml', 'summary.csv'):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


# ----------------------------------------------------------------------------------------------
# Best checkpoints


class CheckpointKeeper:
    """ timm's CheckpointSaver for Accelerate training states: `last/` after every validated epoch, the
    `max_history` best epochs as `checkpoint-<epoch>/` (hard links to what `last/` held), and the best model
    as `model_best.safetensors` and `model_best/`.

    `history` ([[metric, epoch], ...], best first) lives in the checkpointed train state, so a resumed run
    ranks its epochs as the uninterrupted run would. `materialize` makes the folders agree with the history;
    it is idempotent, so a run killed between the save and the links repairs itself on resume.
    """

    def __init__(self, run_dir, history: list, max_history: int, decreasing: bool):
        self.run_dir = Path(run_dir)
        self.history = history
        self.max_history = max_history
        self.decreasing = decreasing

    def rank(self, epoch: int, metric: float) -> bool:
        """ Enter `epoch` into the history; True if it is the new best. """
        self.history.append([metric, epoch])
        self.history.sort(key=lambda row: (row[0] if self.decreasing else -row[0], row[1]))
        del self.history[self.max_history:]
        return self.history[0][1] == epoch

    @property
    def best(self):
        return tuple(self.history[0]) if self.history else (None, None)

    def materialize(self, last_epoch: int, export_best=None):
        """ Link the kept epochs from last/ (only `last_epoch` can be missing) and drop the others; when the best
        epoch is `last_epoch`, `export_best()` (re)writes model_best; drop a recovery state that last/ superseded.
        Main process only. """
        kept = {epoch for _, epoch in self.history}
        if last_epoch in kept and not (self.run_dir / f'checkpoint-{last_epoch}').is_dir():
            _link_tree(self.run_dir / LAST, self.run_dir / f'checkpoint-{last_epoch}')
        for path in self.run_dir.glob('checkpoint-*'):
            if (m := _BEST.match(path.name)) and int(m.group(1)) not in kept:
                shutil.rmtree(path)
        if export_best is not None and self.best[1] == last_epoch:
            export_best()
        if (self.run_dir / RECOVERY).is_dir() and not newest_state(self.run_dir).name == RECOVERY:
            shutil.rmtree(self.run_dir / RECOVERY)  # superseded by last/, which is complete
