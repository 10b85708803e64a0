""" One complete G-Mix / BG-Mix / DG-Mix update: `gmix_step`.

    1. ascent pass at w on the mixed batch (under `no_sync`: each replica perturbs by its own gradient)
    2. e from the ascent gradient; w <- w + e
    3. bg/dg only: sensitivity forward at w + e without gradient, flag ceil(gamma * B) examples
    4. descent pass at w + e on the descent batch (the mixed batch for g)
    5. restore w by copy (also when the pass at w + e raises), unscale, clip, step the base optimizer

Every pass at w + e normalizes with batch statistics but leaves BatchNorm running statistics as
they were. Dropout and drop-path draw fresh masks in each pass. With an optimizer that is not SAM the
same function makes a plain step (one pass), so baselines run through the same code.

The SAM optimizer's cheaper options (see `timm_gmix.sam`) change the passes:
    interval=K          updates between the full steps make one pass on the mixed batch at w
    reuse=ALPHA         LookSAM: a full step keeps the part of its descent gradient orthogonal to the ascent
                        gradient (for bg/dg: the sharpness and the clean-example correction of the flagged
                        examples together, as one direction); a one-pass update adds it back, rescaled
    perturb='momentum'  e comes from the base optimizer's momentum, so 1 has no backward pass: G-Mix makes one
                        forward-backward at w + e (which updates BatchNorm's statistics); BG-/DG-Mix keep the
                        exact s_i from a forward at w and one at w + e, both without gradient, then step 4

The guard (`timm_gmix.guard`) keeps a bad update from leaving a bad state: by default a non-finite loss or
gradient skips the update before it is made; `guard='undo'` also undoes an update that made the weights or the
optimizer state non-finite. Host syncs: one per update on the g path and for a plain step, the guard's decision
(which every replica shares). After a non-finite ascent the pass at w + e runs at NaN weights, so that a
GradScaler sees the overflow and backs off. BG/DG add the reads that selecting the flagged examples needs.
"""
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from timm.utils import dispatch_clip_grad

from .guard import GUARDS, StepGuard, update_is_finite
from .mixup import GMixup, MixedBatch
from .sam import find_sam
from .sensitivity import flag_examples

CLIP_MODES = ('norm', 'value', 'agc')  # timm's --clip-mode


def cross_entropy_per_example(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """ Per-example cross-entropy for class indices (with label smoothing) or soft targets
    (already smoothed by the mixing function). """
    if target.ndim == 1:
        return F.cross_entropy(logits, target, reduction='none', label_smoothing=smoothing)
    return F.cross_entropy(logits, target, reduction='none')


@dataclass
class StepResult:
    """ `loss`: mean loss at w on the (mixed) batch (at w + e for G-Mix with a momentum perturbation, which makes
    no pass at w). `skipped`: no update was made (non-finite loss or gradient, or `diverged`). `diverged`: the
    gradients were finite but the update made weights or optimizer state non-finite, so it was undone (guard
    'undo' only). `full_step`: the two-pass SAM step was made (not a plain optimizer, nor SAM's one-pass updates
    between full steps). For bg/dg full steps: per-example `sensitivity`, the `flagged` mask and
    `mixes_two_classes` (None when the pass at w was not finite). """
    loss: torch.Tensor
    skipped: bool
    sensitivity: Optional[torch.Tensor] = None
    flagged: Optional[torch.Tensor] = None
    mixes_two_classes: Optional[torch.Tensor] = None
    diverged: bool = False
    full_step: bool = False


@contextmanager
def frozen_bn_stats(model: torch.nn.Module):
    """ BatchNorm normalizes with batch statistics, as in training, but its running statistics stay put. """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class Passes:
    """ Forward and backward passes of one update over `accum_steps` micro-batches, under the accelerator's
    autocast, `no_sync` and loss scale (or a GradScaler's). A loss is the sum of weighted per-example losses over
    the whole batch size, so the micro-batches add up to the whole-batch gradient. """

    def __init__(self, model, loss_fn, accelerator, scaler, accum_steps: int, batch_size: int):
        self.model, self.loss_fn, self.accelerator, self.scaler = model, loss_fn, accelerator, scaler
        self.accum_steps, self.batch_size = accum_steps, batch_size
        self.autocast = accelerator.autocast if accelerator is not None else nullcontext
        self.no_sync = (lambda: accelerator.no_sync(model)) if accelerator is not None \
            else getattr(model, 'no_sync', nullcontext)

    def _micro_batches(self, *tensors):
        return list(zip(*(t.tensor_split(self.accum_steps) for t in tensors)))

    def _backward(self, loss):
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def gradient(self, x, y, weights=None, sync: bool = True) -> torch.Tensor:
        """ Accumulate the gradient of sum_i weights_i * l_i / B (all-reduced on the last micro-batch if `sync`);
        returns the per-example losses. """
        chunks = self._micro_batches(x, y) if weights is None else self._micro_batches(x, y, weights)
        losses = []
        for i, (xc, yc, *wc) in enumerate(chunks):
            with nullcontext() if sync and i == len(chunks) - 1 else self.no_sync():
                with self.autocast():
                    loss = self.loss_fn(self.model(xc), yc)
                self._backward((loss * wc[0] if wc else loss).sum() / self.batch_size)
            losses.append(loss.detach())
        return torch.cat(losses)

    @torch.no_grad()
    def losses(self, x, y) -> torch.Tensor:
        """ Per-example losses without gradient. """
        with self.autocast():
            return torch.cat([self.loss_fn(self.model(xc), yc) for xc, yc in self._micro_batches(x, y)])


def finite(*tensors: torch.Tensor) -> torch.Tensor:
    """ A 0-d bool: every element of every tensor is finite. """
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def sam_passes(sam, optimizer, model, passes: Passes, batch: MixedBatch, mixup_fn, mode: str, sync_ascent: bool):
    """ The passes of a full SAM step: the gradient at w (with a momentum perturbation: only the losses at w that
    bg/dg need), then at w + e the sensitivity and flagging (bg/dg) and the descent gradient, with w restored
    however they end. Returns (losses at w or None, descent losses, sensitivity, flagged, ascent finite). """
    ascent_ok, grad_norm, loss_w = torch.ones((), dtype=torch.bool, device=batch.inputs.device), None, None
    if sam.perturbation == 'gradient':
        loss_w = passes.gradient(batch.inputs, batch.targets, sync=sync_ascent)
        grad_norm = sam.grad_norm()
        ascent_ok = finite(loss_w, grad_norm)
        grad_norm = torch.where(ascent_ok, grad_norm, float('nan'))  # a NaN w + e: a GradScaler sees the overflow
    elif mode in ('bg', 'dg'):  # momentum: the losses at w for the sensitivity, and BatchNorm's statistics
        loss_w = passes.losses(batch.inputs, batch.targets)
        ascent_ok = finite(loss_w)
    sensitivity = flagged = None
    try:
        with sam.perturbed(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            with frozen_bn_stats(model) if loss_w is not None else nullcontext():
                if mode in ('bg', 'dg'):
                    sensitivity = passes.losses(batch.inputs, batch.targets) - loss_w
                    flagged = flag_examples(sensitivity, mixup_fn.gmix_ratio, mixup_fn.gmix_flag == 'largest')
                    x, y, weights = batch.descent_batch(flagged, mode)
                else:  # g: the mixed batch again (descent_batch would read `flagged` on the host)
                    x, y, weights = batch.inputs, batch.targets, None
                loss_e = passes.gradient(x, y, weights)
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        raise
    return loss_w, loss_e, sensitivity, flagged, ascent_ok


_GUARDS = weakref.WeakKeyDictionary()  # optimizer -> its StepGuard, so the copies outlive one step


def gmix_step(
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mixup_fn: Optional[Callable] = None,
        loss_fn: Callable = cross_entropy_per_example,
        accelerator=None,
        scaler: Optional[torch.amp.GradScaler] = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        sync_ascent: bool = False,
        accum_steps: int = 1,
        guard: str = 'skip',
) -> StepResult:
    """ Make one complete update of `model` from a raw batch.

    Args:
        optimizer: SAM (`opt='gmix_sam'`), possibly in Lookahead and/or Accelerate's wrapper; any other
            optimizer makes a plain step
        mixup_fn: `GMixup` (its mode picks g/bg/dg), timm's `Mixup`, or None (plain SAM)
        loss_fn: per-example loss `loss_fn(logits, targets) -> (B,)`
        accelerator: runs the passes under its autocast, `no_sync` and GradScaler
        scaler: a GradScaler, for use without an accelerator (with one, its own scaler is used)
        clip_grad, clip_mode: as timm's `--clip-grad`/`--clip-mode`, applied to unscaled gradients
        sync_ascent: all-reduce the ascent gradient too (the perturbation then uses the global norm)
        accum_steps: split the batch in this many micro-batches; the update equals the whole-batch one
        guard: 'skip' or 'undo' (see `timm_gmix.guard`)
    """
    check_step_arguments(len(inputs), clip_grad, clip_mode, accum_steps, guard)
    if accelerator is not None:
        if scaler is not None:
            raise ValueError('pass a GradScaler only without an accelerator: the accelerator brings its own')
        if accelerator.gradient_accumulation_steps > 1:
            raise ValueError('use gmix_step(accum_steps=K) rather than Accelerator(gradient_accumulation_steps)')
        scaler = accelerator.scaler
    stepper = getattr(optimizer, 'optimizer', optimizer) if accelerator is not None else optimizer
    sam = find_sam(stepper)
    mode = getattr(mixup_fn, 'gmix_mode', None) or 'g'
    if mode in ('bg', 'dg') and sam is None:
        raise ValueError(f'mixup mode {mode!r} needs the SAM optimizer (--opt gmix_sam)')

    if isinstance(mixup_fn, GMixup):
        batch = mixup_fn.mix(inputs, targets)
    elif mixup_fn is not None:
        batch = MixedBatch.unmixed(*mixup_fn(inputs, targets))
    else:
        batch = MixedBatch.unmixed(inputs, targets)
    passes = Passes(model, loss_fn, accelerator, scaler, accum_steps, len(batch.inputs))
    copies = _GUARDS.setdefault(stepper, StepGuard())
    copies.save_buffers(model)

    full = sam is not None and sam.is_full_step()
    sensitivity = flagged = None
    if full:
        loss_w, loss_e, sensitivity, flagged, ascent_ok = sam_passes(
            sam, stepper, model, passes, batch, mixup_fn, mode, sync_ascent)
    else:  # a plain optimizer, or SAM between its full steps: one pass on the mixed batch
        loss_w = loss_e = passes.gradient(batch.inputs, batch.targets)
        ascent_ok = torch.ones((), dtype=torch.bool, device=loss_e.device)
    if scaler is not None:
        scaler.unscale_(stepper)
    params = [p for group in stepper.param_groups for p in group['params'] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    checks = [ascent_ok, finite(grad_norm, loss_e)]

    def update():
        """ LookSAM's reused direction, clipping, and the base optimizer's step. """
        norm = grad_norm
        if sam is not None and sam.looksam:
            reuse_gradient(sam, full, accelerator if not sync_ascent else None)
            norm = None
        if clip_grad is not None:
            clip(params, clip_grad, clip_mode, norm)
        with sam.base_step() if sam is not None else nullcontext():
            stepper.step()

    if guard == 'undo':  # made, then undone if it failed: the decision needs one host read either way
        copies.save(stepper, sam.saved_w if full else None)
        update()
        checks.append(update_is_finite(stepper, ascent_ok.device, model.buffers()))
        ascent_ok, descent_ok, update_ok = all_agree(checks, accelerator)
        made = ascent_ok and descent_ok and update_ok
        if not made:
            copies.undo()
    else:
        ascent_ok, descent_ok = all_agree(checks, accelerator)
        made = update_ok = ascent_ok and descent_ok
        if made:
            update()
        else:
            copies.restore_buffers()
    result = StepResult(loss=(loss_e if loss_w is None else loss_w).mean(), skipped=not made,
                        diverged=ascent_ok and descent_ok and not update_ok, full_step=full)
    if sensitivity is not None and ascent_ok:
        result.sensitivity, result.flagged, result.mixes_two_classes = sensitivity, flagged, batch.mixes_two_classes
    if made and sam is not None:
        sam.count_update()
    if scaler is not None:
        scaler.update()
    stepper.zero_grad(set_to_none=True)
    return result


def check_step_arguments(batch_size: int, clip_grad, clip_mode: str, accum_steps, guard: str):
    """ ValueError for a gmix_step argument that cannot work. """
    if not (isinstance(accum_steps, int) and 1 <= accum_steps <= batch_size):
        raise ValueError(f'accum_steps must be a whole number from 1 to the batch size ({batch_size}), '
                         f'got {accum_steps!r}')
    if clip_mode not in CLIP_MODES:
        raise ValueError(f'unknown clip_mode {clip_mode!r}: choose one of {", ".join(CLIP_MODES)}')
    if clip_grad is not None and not (isinstance(clip_grad, (int, float)) and math.isfinite(clip_grad) and clip_grad > 0):
        raise ValueError(f'clip_grad must be a positive number, or None for no clipping, got {clip_grad!r}')
    if guard not in GUARDS:
        raise ValueError(f'unknown guard {guard!r}: choose one of {", ".join(GUARDS)}')


def clip(params: List[torch.Tensor], clip_grad: float, clip_mode: str, norm: Optional[torch.Tensor] = None):
    """ timm's clipping of the (unscaled) gradients; `norm`: their total norm, when it is known already. """
    if clip_mode == 'norm':
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    else:
        dispatch_clip_grad(params, clip_grad, mode=clip_mode)


def all_agree(flags: List[torch.Tensor], accelerator=None) -> List[bool]:
    """ The one host read of a step. A flag is true only where it is true on every replica: replicas must take
    the same branch, or the next all-reduce waits forever. """
    flags = torch.stack(flags)
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.float(), reduction='sum') == accelerator.num_processes
    return flags.tolist()


def reuse_gradient(sam, full: bool, accelerator=None):
    """ LookSAM: keep g_v on a full step (averaged over processes, since each perturbed by its own gradient at
    w), add it on a one-pass update. """
    if not full:
        sam.looksam.add_to(sam.gradients())
        return
    sam.looksam.keep_orthogonal_part(sam.gradients())
    if accelerator is not None and accelerator.num_processes > 1:
        g_v = sam.looksam.parts()
        for t in g_v:
            torch.distributed.all_reduce(t)
        torch._foreach_div_(g_v, float(accelerator.num_processes))
