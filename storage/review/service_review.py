"""The service's queue of where to work next (part of :class:`storage.service.Neuroseg`, issue 29): read a
dataset's queue, rank it again, take its best item (Next); a saved mask marks the items it did
(:mod:`storage.review.worklist`)."""

from __future__ import annotations

from domain.review import WorkItemInfo, WorkList
from storage.facade import Facade, guard, looks
from storage.review import worklist


class ReviewService(Facade):
    """The shared queue."""

    @looks
    def work_list(self, dataset_id: int) -> WorkList:
        """The dataset's queue: open items best first, the ones done newest first."""
        return self._tx(worklist.work_list, dataset_id)

    @guard("rank queue", "annotate", record=False)
    def rank_work(self, dataset_id: int) -> WorkList:
        """Rank the dataset's slices and regions again from its newest predictions and its masks."""
        return self._tx(worklist.rank, self.store, dataset_id)

    @guard("take queue item", "annotate", record=False)
    def next_work(self, dataset_id: int, author: str = "") -> WorkItemInfo | None:
        """Next: the best open item, now taken by this user (ranked first when the queue has never been)."""
        work = self.work_list(dataset_id)
        if work.ranked is None and not work.open:
            self._tx(worklist.rank, self.store, dataset_id)
        return self._tx(worklist.take, dataset_id, self._author(author))
