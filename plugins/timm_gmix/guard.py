""" The step guard: what `gmix_step` keeps so that a bad update leaves no bad state behind.

Two levels (`gmix_step(guard=...)`, train.py's `--step-guard`):

    skip  (default) a non-finite loss or gradient in any pass skips the update before it is made, as a
          GradScaler skips one; the BatchNorm statistics that the pass at w moved are put back. Costs a
          gradient norm (which clipping reuses), a copy of the model's buffers and one host read per update.
    undo  also undoes an update that was made from finite gradients but left the weights, the optimizer state or
          the BatchNorm statistics non-finite (an lr far too large), bit for bit. Costs, per update, a copy of
          the weights (none on SAM's full steps, which keep w anyway) and of the optimizer state, and a
          finiteness check of all of them.

With `skip`, such an update is not undone: its non-finite weights make the next updates non-finite, which are
skipped, and train.py stops after --max-bad-steps of them; no state with a non-finite value is ever saved.
"""
from typing import Callable, Iterable, List, Optional, Tuple

import torch

from .sam import TensorCopy, grouped

GUARDS = ('skip', 'undo')


def optimizer_states(optimizer) -> List[dict]:
    """ The state of an optimizer and of those it wraps (timm's Lookahead keeps its slow weights in its
    base's state; SAM shares its base's and keeps LookSAM's g_v in its own `sam_state`). """
    states = []
    while optimizer is not None:
        for state in (optimizer.state, getattr(optimizer, 'sam_state', None)):
            if state is not None and all(state is not s for s in states):
                states.append(state)
        optimizer = getattr(optimizer, '_base_optimizer', None) or getattr(optimizer, 'base_optimizer', None)
    return states


def tensors_in(states: Iterable[dict]) -> List[torch.Tensor]:
    """ The tensors in optimizer states ({parameter: {name: value}}). """
    return [v for state in states for s in state.values() for v in s.values() if torch.is_tensor(v)]


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """ A 0-d bool on `device`: every floating-point element is finite. Per tensor, sum |x| (in float32 or
    wider) is NaN or inf when an element is, and otherwise only past 3.4e38, far beyond trainable values
    (max |x| has no such bound but is several times slower on CPU). Tensors on another kind of device are
    left out: reading them would wait for the accelerator (Adam's CPU step counts beside CUDA parameters). """
    flags = [torch.ones((), dtype=torch.bool, device=device)]
    for group, in grouped(tensors):
        if group[0].device.type == device.type and group[0].is_floating_point():
            norms = torch._foreach_norm(group, 1, dtype=torch.promote_types(group[0].dtype, torch.float32))
            flags.append(torch.stack(norms).isfinite().all().to(device))
    return torch.stack(flags).all()


def all_agree(flags: List[torch.Tensor], accelerator=None) -> List[bool]:
    """ The one host read of a step. A flag is true only where it is true on every replica: replicas must take
    the same branch, or the next all-reduce waits forever. """
    flags = torch.stack(flags)
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.float(), reduction='sum') == accelerator.num_processes
    return flags.tolist()


def update_is_finite(optimizer: torch.optim.Optimizer, device: torch.device, buffers=()) -> torch.Tensor:
    """ A 0-d bool on `device`: the parameters, the optimizer state and `buffers` (the model's: BatchNorm
    statistics overflow too) are finite. """
    params = [p for group in optimizer.param_groups for p in group['params']]
    return all_finite(params + tensors_in(optimizer_states(optimizer)) + list(buffers), device)


class StepGuard:
    """ The copies one optimizer's updates are guarded with, kept between steps (allocated once).

    `save_buffers(model)` before the first pass; then either `restore_buffers()` for a skipped update, or, at level
    `undo`, `save(optimizer)` just before the update is made and `undo()` after it. `undo` puts back the model's
    buffers, the parameters, every tensor and value in the optimizer's state (Lookahead's slow weights included) and
    the values of its parameter groups (Lookahead counts its steps there). """

    def __init__(self):
        self._model_buffers = TensorCopy()
        self._own_weights = TensorCopy()
        self._weights = self._own_weights
        self._state_tensors = TensorCopy()
        self._states = []
        self._groups = []

    def save_buffers(self, model: torch.nn.Module):
        self._model_buffers.save(model.buffers())

    def restore_buffers(self):
        self._model_buffers.restore()

    def guarded(self, level: str, optimizer, update: Callable[[], None], checks: List[torch.Tensor],
                accelerator=None, buffers=(), weights: Optional[TensorCopy] = None) -> Tuple[bool, bool]:
        """ Make `update` if every check of the passes (0-d bools) holds on every replica, at `level`; returns
        (made, diverged): diverged when the checks held but the update left a non-finite value (`undo` only),
        in which case it was undone. `buffers` are the model's, checked with the update at level `undo`. """
        if level == 'undo':  # made, then undone if it failed: the decision needs one host read either way
            self.save(optimizer, weights)
            update()
            *passes_ok, update_ok = all_agree(checks + [update_is_finite(optimizer, checks[0].device, buffers)],
                                              accelerator)
            made = all(passes_ok) and update_ok
            if not made:
                self.undo()
            return made, all(passes_ok) and not update_ok
        made = all(all_agree(checks, accelerator))
        if made:
            update()
        else:
            self.restore_buffers()
        return made, False

    def save(self, optimizer: torch.optim.Optimizer, weights: Optional[TensorCopy] = None):
        """ `weights`: an exact copy of the parameters already made (SAM's w), used instead of making one. """
        if weights is None:
            self._own_weights.save(p for group in optimizer.param_groups for p in group['params'])
        self._weights = self._own_weights if weights is None else weights
        self._states = [(state, {p: dict(s) for p, s in state.items()}) for state in optimizer_states(optimizer)]
        self._state_tensors.save(tensors_in(saved for _, saved in self._states))
        self._groups = [(g, {k: v for k, v in g.items() if k != 'params'}) for g in optimizer.param_groups]

    def undo(self):
        self._model_buffers.restore()
        self._weights.restore()
        self._state_tensors.restore()  # into the tensors the state held before: put them back below
        for state, saved in self._states:
            state.clear()
            state.update(saved)
        for group, saved in self._groups:
            for k in set(group) - set(saved) - {'params'}:
                del group[k]
            group.update(saved)
