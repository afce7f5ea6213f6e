"""GPU out of memory as a resumable stop, and ``--resume --batch B``: the batch changed mid-run.

The step loop writes each batch of patches back into the band in place, so when a forward pass
runs out of memory the band is part one step, part the next: it is never saved. The run stops
with one line naming the batch size and the command to continue with a smaller one; the resume
starts from the last ``state/`` checkpoint of the stage (or the stage's start), which the store
still holds untouched. A resume with another ``--batch`` records the change (stage, step,
old → new) in the store's ``config`` and ``key``: the bytes then equal those of a run with the same
history, not of an uninterrupted one (docs/architecture.md, "Changing the batch on resume").
"""

from __future__ import annotations

from ..errors import WsigenError


class OutOfMemoryStop(WsigenError):
    """The device ran out of memory in stage ``stage`` at step ``step``; resumable from ``resume_step``."""

    def __init__(self, stage: int, step: int, steps: int, batch: int, resume_step: int, command: str):
        self.stage, self.step, self.batch, self.resume_step = stage, step, batch, resume_step
        where = (f"its checkpoint after step {resume_step}" if resume_step
                 else f"the start of stage {stage}")
        if batch > 1:
            advice = f"continue with a smaller batch: {command} --batch {max(1, batch // 2)}"
        else:
            advice = (f"--batch 1 is the smallest; continue with {command} on a device with more "
                      "free memory (or --state-device cpu)")
        super().__init__(f"out of GPU memory in stage {stage} at step {step + 1} of {steps} with "
                         f"--batch {batch}; the store is resumable from {where}: {advice}")


def resume_point(info: dict) -> tuple[int, int]:
    """(stage, step) a resume of this store starts from: the first incomplete stage, at its
    checkpoint if it has one."""
    done = set(info["stages_complete"])
    stage = next((st["index"] for st in info["stages"] if st["index"] not in done), len(info["stages"]) - 1)
    state = info.get("state") or {}
    return stage, state.get("step", 0) if state.get("stage") == stage else 0


def record_batch_change(store, new: int, log=None) -> None:
    """Write ``config.batch = new`` and the change (stage, step, old → new) into the store (rank 0)."""
    info = store.info
    cfg, key = dict(info["config"]), dict(info.get("key") or {})
    old = cfg["batch"]
    if new == old:
        return
    stage, step = resume_point(info)
    change = {"stage": stage, "step": step, "old": old, "new": new}
    history = [*cfg.get("batch_changes", []), change]
    cfg.update(batch=new, batch_changes=history)
    key.update(batch=new, batch_changes=history)
    store.update_info(config=cfg, key=key)
    if log:
        log(f"--batch {old} → {new} from stage {stage} step {step} (recorded in the store's configuration)")
