""" Run folders and checkpoints, kept as timm keeps them, written so that no run ever loses another's work.

One run, one folder `OUTPUT/EXPERIMENT/` (a new run never reuses a folder that holds a run's work; a second
process is locked out):

    args.yaml, summary.csv
    last/                   training state after the latest validated epoch
    checkpoint-<epoch>/     the --checkpoint-hist best epochs by --eval-metric (full training states)
    recovery/               mid-epoch training state, every --recovery-interval updates
    recovery-diverged/      a recovery state set aside when the run diverged after it (never resumed by default)
    model_best.safetensors  weights of the best epoch, for timm.models.load_checkpoint (validate.py --checkpoint)
    model_best/             the best model, for timm.create_model('local-dir:...', pretrained=True)
    model/                  the final model

A training state is Accelerate's `save_state` (weights as safetensors, optimizer, scheduler, scaler, RNG
states and the registered objects) plus `checkpoint.json`: where in training it was taken, what it was
trained with, and every file with its size. It is written under a temporary name and only then renamed over
the previous one. A failure to write (a full disk, no permission) removes the temporary and stops the run
with one line that names what could not be written and what on disk is intact.
"""
import datetime
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ..guard import all_finite as finite_on
from .errors import UsageError, reason

MANIFEST = 'checkpoint.json'
LAST, RECOVERY, DIVERGED = 'last', 'recovery', 'recovery-diverged'
_BEST = re.compile(r'^checkpoint-(\d+)$')
# What a resumed run must share with the checkpoint to continue it, with the flag that sets each.
RESUME_KEYS = {'model': '--model', 'num_classes': '--num-classes', 'opt': '--opt', 'sam_base': '--sam-base',
               'model_ema': '--model-ema', 'num_processes': 'accelerate launch --num_processes'}
# What a failed write raises: OSError from Python, SafetensorError from safetensors, RuntimeError from torch.save.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


class Stopped(SystemExit):
    """ Training cannot go on: one line saying why and what on disk is intact (exit status 1). """


# ----------------------------------------------------------------------------------------------
# Run folders


def holds_work(run_dir) -> bool:
    """ Whether `run_dir` holds a run's work: a training state or a model. A folder with only args.yaml (and
    perhaps summary rows, or a diverged recovery state) is a run that stopped before its first checkpoint,
    which may start again there. """
    run_dir = Path(run_dir)
    return any(p.is_dir() and (p.name in (LAST, RECOVERY, 'model', 'model_best') or _BEST.match(p.name))
               for p in run_dir.iterdir()) if run_dir.is_dir() else False


def new_run_dir(output: str, experiment: str, default_name: str) -> Path:
    """ A folder for a new run: OUTPUT/EXPERIMENT, or OUTPUT/<date-time>-<default_name> (timm's naming, with -1,
    -2, ... when two runs start in the same second). An EXPERIMENT that holds a run's work is refused; one that
    holds none (a run stopped before its first checkpoint) is started again. """
    output = Path(output or 'output/train')
    try:
        output.mkdir(parents=True, exist_ok=True)
        if experiment:
            run_dir = output / experiment
            if holds_work(run_dir):
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
    except OSError as e:
        raise UsageError(f'cannot make a run folder in {output} ({write_error(e)}): choose another --output') from e
    raise UsageError(f'could not make a new run folder in {output}: pass --experiment NAME')


class RunLock:
    """ An exclusive lock on a run folder for as long as this process trains in it. The kernel drops it when
    the process ends, however it ends, so a crashed run never leaves a stale lock. Taking it writes to the
    folder, so a folder the run could not write to is found here, before training. """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / '.lock'
        try:
            self.file = open(self.path, 'a+')
        except OSError as e:
            raise UsageError(f'cannot write to {run_dir} ({write_error(e)}): choose another --output') from e
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or 'another process'
            self.file.close()
            raise UsageError(f'{run_dir} is in use by {owner}: wait for that run to end, or start a new run '
                             f'(without --experiment, or with another name)') from None
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f'process {os.getpid()}')
            self.file.flush()
        except OSError as e:
            raise UsageError(f'cannot write to {run_dir} ({write_error(e)}): choose another --output') from e

    def release(self):
        self.file.close()


# ----------------------------------------------------------------------------------------------
# Writing without losing what is there


def write_error(error: Exception, folder=None) -> str:
    """ What the operating system said about a failed write in `folder`, from whichever library made it. torch's
    writer drops it ('unexpected pos 576 vs 534' for a full disk): then `folder` is written to again to hear it. """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r'(?:I/O error|message): "?([^"(]+?)"? \(?os error \d+\)?', str(error))
    if found:
        return found.group(1)
    return (folder is not None and _probe(Path(folder))) or reason(re.sub(r'^\[enforce fail at [^]]*\] \.? *', '',
                                                                          str(error)))


def _probe(folder: Path) -> str:
    """ The OS's reason why a small file cannot be written in `folder`, '' if it can. """
    probe = folder / '.write-probe'
    try:
        with open(probe, 'wb') as f:
            f.write(bytes(2 ** 16))
            f.flush()
            os.fsync(f.fileno())
        return ''
    except OSError as e:
        return e.strerror or ''
    finally:
        clean_up(probe)


def remove(path: Path):
    """ Remove a file or folder if it is there, asking nothing of the file system when it is not (a read-only one
    refuses to remove even what is not there). """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def clean_up(path: Path):
    """ `remove` after a failed write: failing too (a read-only file system), it would hide why the write failed. """
    try:
        remove(path)
    except OSError:
        pass


def write_failed(path: Path, why: str) -> Stopped:
    """ The one line for a failed write of `path`, a file or folder of a run folder, for the OS's reason `why`. """
    try:
        free = f', {shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free there'
    except OSError:
        free = ''
    return Stopped(f'error: could not write {path} ({why}{free}); {on_disk(path.parent)}')


@contextmanager
def writing(path):
    """ Yields `path`.tmp to write `path` under, and renames it into place when the block ends (a folder
    replaces an older `path` only once complete). If a write fails, the temporary is removed and the run stops
    with one line naming `path` and what on disk is intact. """
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        remove(tmp)
        yield tmp
        replace_dir(tmp, path) if tmp.is_dir() else os.replace(tmp, path)
    except WRITE_ERRORS as e:
        why = write_error(e, path.parent)
        clean_up(tmp)
        raise write_failed(path, why) from e


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


def delete(folder: Path):
    """ Remove a folder of the run, failing as a write does. """
    try:
        shutil.rmtree(folder)
    except OSError as e:
        raise write_failed(folder, write_error(e)) from e


def _link_tree(source: Path, target: Path):
    """ A copy of a checkpoint folder made of hard links (no second copy on disk). """
    with writing(target) as tmp:
        shutil.copytree(source, tmp, copy_function=os.link)


# ----------------------------------------------------------------------------------------------
# Training states


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
    """ Accelerate's full training state in `folder`, with its manifest, replacing what was there only once
    complete. Every process calls it; the caller has checked that what it saves is finite (`all_finite`). """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + '.tmp')
    try:
        if accelerator.is_main_process:
            remove(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {**meta, 'num_processes': accelerator.num_processes, 'files': files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            replace_dir(tmp, folder)
    except WRITE_ERRORS as e:
        why = write_error(e, folder.parent)
        clean_up(tmp)
        raise write_failed(folder, why) from e
    accelerator.wait_for_everyone()
    return folder


def newest_state(run_dir) -> Optional[Path]:
    """ The state a run continues from: the later of last/ and recovery/ (None if it has neither). A folder
    without its manifest is refused: a newer state may be the one that is damaged. A process killed between
    the two renames of `replace_dir` left the new state complete under .tmp: it is put in place. """
    for name in (LAST, RECOVERY):
        final = Path(run_dir) / name
        tmp, old = final.with_name(name + '.tmp'), final.with_name(name + '.old')
        if not final.exists() and old.is_dir() and (tmp / MANIFEST).is_file():
            os.replace(tmp, final)
            shutil.rmtree(old)
    found = [p for p in (Path(run_dir) / LAST, Path(run_dir) / RECOVERY) if p.is_dir()]
    return max(found, key=lambda p: tuple(read_manifest(p)['position'])) if found else None


def describe(state: Path) -> str:
    """ Where in training a state was taken, counting epochs from 1 as train.py prints them. """
    epoch, update = read_manifest(state)['position']
    return f'after epoch {epoch}' if update == 0 else f'epoch {epoch + 1}, update {update}'


def on_disk(run_dir) -> str:
    """ What `--resume RUN` continues from, for a one-line message. """
    state = newest_state(run_dir)
    return f'{state} ({describe(state)}) is intact' if state is not None else 'no checkpoint was written yet'


def set_aside_recovery(run_dir):
    """ After a divergence: a recovery state newer than last/ may already be past it (it has no validation), so
    it becomes recovery-diverged/, which `--resume RUN` does not take. Main process only. """
    if (Path(run_dir) / RECOVERY).is_dir():
        try:
            replace_dir(Path(run_dir) / RECOVERY, Path(run_dir) / DIVERGED)
        except OSError as e:
            raise write_failed(Path(run_dir) / DIVERGED, write_error(e)) from e


@dataclass
class Resume:
    """ What `--resume PATH` continues: `state` in `run_dir`, in its own folder if it is the run's newest state
    (`newest`), else in a new one. `state` is None for a run that stopped before its first checkpoint: it
    starts again in its folder. """
    state: Optional[Path]
    run_dir: Path
    newest: bool = True


def resolve_resume(path) -> Resume:
    """ --resume PATH: a run folder (its newest state) or one of its state folders. """
    path = Path(path)
    if path.is_dir() and (path / 'args.yaml').is_file():
        state = newest_state(path)
        if state is None and holds_work(path):
            raise UsageError(f'the run in {path} has no last/ or recovery/ state to continue from: resume from one '
                             f'of its checkpoint-<epoch>/ folders, or start a new run')
        return Resume(state, path)
    if not path.is_dir() or not (path / 'model.safetensors').is_file():
        raise UsageError(f'no checkpoint at {path}: pass a run folder, or one of its last/, recovery/ or '
                         f'checkpoint-<epoch>/ folders')
    return Resume(path, path.parent, newest_state(path.parent) == path)


def load_state(accelerator, folder, expected: dict):
    """ Restore what `save_state` saved, after checking the manifest: every file there with its size, and the
    same model, classes, optimizer, EMA and number of processes (`expected`, keys of RESUME_KEYS). """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problem = _verify(folder, manifest)
    if problem:
        raise UsageError(f'checkpoint {folder} is incomplete or damaged ({problem}): resume from another '
                         f'checkpoint of the run')
    expected = {**expected, 'num_processes': accelerator.num_processes}
    for key, flag in RESUME_KEYS.items():
        if key in manifest and manifest[key] != expected[key]:
            was = (f'with {flag}, not without' if manifest[key] else f'without {flag}, not with it') \
                if isinstance(manifest[key], bool) else f'with {flag} {manifest[key]}, not {expected[key]}'
            raise UsageError(f'checkpoint {folder} was trained {was}: resume with the same {flag}, or start a new '
                             f'run')
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
            with writing(target / name) as tmp:
                shutil.copy2(source / name, tmp)


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
                delete(path)
        if export_best is not None and self.best[1] == last_epoch:
            export_best()
        if (self.run_dir / RECOVERY).is_dir() and not newest_state(self.run_dir).name == RECOVERY:
            delete(self.run_dir / RECOVERY)  # superseded by last/, which is complete
