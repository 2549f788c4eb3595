"""The service's live loop (part of :class:`storage.service.Neuroseg`): turn a dataset's live session on,
say which slice a viewer looks at, leave, stop, read its newest predictions (:mod:`storage.records.live`)."""

from __future__ import annotations

from domain.live import LiveInfo, LivePrediction
from domain.records import RunInfo
from storage.auth import users
from storage.facade import Facade, guard, looks
from storage.jobs import queue
from storage.records import live


class LiveService(Facade):
    """The live loop."""

    # --- the live loop ---------------------------------------------------------------------------------
    @looks
    def live(self, dataset_id: int) -> LiveInfo | None:
        """The dataset's live session (queued, running or paused), or None."""
        return self._tx(live.current, dataset_id)

    @guard("live", "train", "dataset")
    def live_start(self, dataset_id: int, checkpoint_id: int | None, owner: str,
                   scratch: bool = False) -> tuple[LiveInfo, str]:
        """Turn Live on: join the dataset's session, resume its lost one, or start one from the checkpoint
        (``scratch``: from random weights, taught by a forest of the strokes). Returns the session and
        "joined", "resumed" or "started"."""
        info, what = self._tx(live.start, dataset_id, checkpoint_id, self._owner(owner), scratch)
        if what == "started" and self.actor.user_id is not None:
            self._tx(users.set_owner, "run", info.run.id, self.actor.user_id)
        queue.start_queued(self.sessions, self.settings)
        return self._tx(live.current, dataset_id) or info, what

    @guard("live view", "train", record=False)
    def live_see(self, run_id: int, owner: str, slice_index: int,
                 region: tuple[int, int, int, int] | None = None) -> None:
        """``owner`` is looking at ``slice_index`` (at ``region`` = (y0, x0, h, w) of it when zoomed in: that
        region is predicted first): it (and the slices beside it) is re-predicted."""
        self._tx(live.see, run_id, self._owner(owner), slice_index, region)

    @guard("live view", "train", record=False)
    def live_leave(self, run_id: int, owner: str) -> None:
        self._tx(live.leave, run_id, self._owner(owner))

    @guard("stop live", "train", "run")
    def live_stop(self, run_id: int) -> RunInfo:
        """End the session for everyone; it becomes a finished run with its checkpoints."""
        return self._tx(live.stop, run_id)

    @looks
    def live_prediction(self, run_id: int, slice_index: int, uncertainty: bool = False) -> LivePrediction | None:
        """The session's newest prediction of a slice (with its uncertainty when asked), or None."""
        return self._tx(live.prediction, self.store, run_id, slice_index, uncertainty)
