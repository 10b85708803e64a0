""" Checkpoints and the exported model.

A checkpoint is Accelerate's full training state (weights as safetensors, optimizer, scaler, RNG
states, and the objects registered for checkpointing: scheduler, EMA, train state) in
`<run>/checkpoint-<epoch>`. It is written under a temporary name and renamed, so an interrupted save
never destroys the previous checkpoint. The exported model is a folder that
`timm.create_model('local-dir:<folder>', pretrained=True)` loads.
"""
import csv
import os
import re
import shutil
from pathlib import Path

from timm.models import save_for_hf

from .config import UsageError, reason

_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')


def _replace_dir(tmp: Path, final: Path):
    """ Rename `tmp` to `final`; an existing `final` is removed only after `tmp` is complete. """
    if final.exists():
        old = final.with_name(final.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def list_checkpoints(run_dir) -> list:
    """ Complete checkpoints of a run folder, oldest first. """
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, run_dir, epoch: int, keep: int = 1) -> Path:
    """ Save the training state after `epoch` and drop all but the newest `keep` checkpoints. """
    run_dir = Path(run_dir)
    final, tmp = run_dir / f'checkpoint-{epoch}', run_dir / f'checkpoint-{epoch}.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(path) -> Path:
    """ A checkpoint folder, or the newest complete checkpoint of a run folder. """
    path = Path(path)
    if path.is_dir() and not _CHECKPOINT.match(path.name):
        found = list_checkpoints(path)
        if found:
            return found[-1]
    if not path.is_dir() or not (path / 'model.safetensors').is_file():
        raise UsageError(f'no checkpoint at {path}: pass a checkpoint-<epoch> folder, or a run folder that has one')
    return path


def load_checkpoint(accelerator, path) -> Path:
    """ Restore everything `save_checkpoint` saved; a corrupt checkpoint is a UsageError. """
    checkpoint = resolve_checkpoint(path)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # torch, safetensors and pickle each raise their own kind
        raise UsageError(f'checkpoint {checkpoint} is corrupt or incomplete ({reason(e)}): '
                         f'resume from another checkpoint or start a new run') from e
    return checkpoint


def export_model(model, folder, model_args=None, data_config=None) -> Path:
    """ Write `model` as config.json + model.safetensors for `timm.create_model('local-dir:<folder>')`. """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(model, str(tmp), model_args=model_args, safe_serialization=True, data_config=data_config)
    _replace_dir(tmp, folder)
    return folder


def trim_summary(path, last_epoch: int):
    """ Drop summary.csv rows after `last_epoch`, so a resumed run continues the file without duplicates. """
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(row for row in rows if int(row['epoch']) <= last_epoch)
