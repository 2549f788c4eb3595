"""The shared queue of where to work next (issue 29): ranked from a finished prediction's uncertainty and its
suspicious neurons, shared by everyone on the dataset (two users' Next never get the same item), an item
done by the save of the user who took it, kept through a new ranking, and refused to a viewer."""

from __future__ import annotations

import numpy as np
import pytest

from domain.records import UserError
from storage.models import MaskVersion
from storage.service import Neuroseg
from storage.settings import Settings
from tests.accounts import make_user
from tests.drafts import new_draft, start_options
from tests.store.test_starter import tiny_starter, wait_exit


@pytest.fixture
def predicted(tmp_path, monkeypatch):
    """A store with the demo stack, its masks of slices 2 and up deleted (nobody corrected 0 and 1), and a
    finished prediction of slices 0-2 by a tiny untrained starter."""
    tiny_starter(tmp_path / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))
    svc.close()  # (this test starts the prediction itself)
    demo = svc.load_demo()
    with svc.sessions.begin() as s:
        for row in s.query(MaskVersion).filter(MaskVersion.dataset_id == demo.id, MaskVersion.slice_index < 2):
            s.delete(row)
    job = svc.predict(svc.checkpoint_choices()[0].id, demo.id, [0, 1, 2])
    wait_exit(job.pid)
    assert svc.prediction(job.id).status == "FINISHED", svc.prediction(job.id).error
    yield svc, demo, job, tmp_path / "data"
    svc.close()


def test_the_queue_ranks_regions_and_two_users_share_it(predicted):
    svc, demo, job, data_dir = predicted
    assert svc.work_list(demo.id).open == [] and svc.work_list(demo.id).ranked is None
    work = svc.rank_work(demo.id)
    assert work.ranked is not None
    scores = [i.score for i in work.open]
    assert scores == sorted(scores, reverse=True) and len(work.open) >= 3
    assert {i.source for i in work.open if i.slice_index in (0, 1, 2)} == {f"prediction {job.id}"}
    for item in work.open:
        y0, x0, h, w = item.box
        assert 0 <= y0 < y0 + h <= 256 and 0 <= x0 < x0 + w <= 256
    # the slices nobody corrected rank above the corrected one (their bonus), and the rest has no item
    assert {i.slice_index for i in work.open} <= {0, 1, 2}
    assert max(i.score for i in work.open if i.slice_index == 2) < min(
        max(i.score for i in work.open if i.slice_index == z) for z in (0, 1))
    assert "never corrected" in work.open[0].reasons

    first = svc.next_work(demo.id, "ann")
    second = svc.next_work(demo.id, "bob")
    assert first.id == work.open[0].id and second.id == work.open[1].id  # shared: bob gets the next one
    assert first.taken_by == "ann" and second.taken_by == "bob"
    # a new ranking keeps the taken items; ann's save of her slice marks hers done, not bob's
    again = svc.rank_work(demo.id)
    assert {first.id, second.id} <= {i.id for i in again.open}
    draft = new_draft(svc, demo.id, first.slice_index, start_options(svc, demo.id, first.slice_index)[0])
    edit = np.full(draft.working.shape, 1, np.uint8)
    edit.setflags(write=False)
    draft.working, draft.revision = edit, draft.revision + 1
    saved = svc.save_draft(draft, "ann", owner="ann")
    done = svc.work_list(demo.id).done
    assert [(i.id, i.done_by, i.mask_version_id) for i in done] == [(first.id, "ann", saved.id)]
    assert second.id in {i.id for i in svc.work_list(demo.id).open}
    assert svc.rank_work(demo.id).done[0].id == first.id  # what was done stays on record
    # Next on a slice someone saved starts from that version, with the prediction's neurons for the tools
    kept = svc.draft_start(demo.id, first.slice_index, "latest", mask_id=saved.id, prediction_id=job.id)
    assert (kept.source, kept.source_mask_id, kept.prediction_id) == ("latest", saved.id, job.id)
    np.testing.assert_array_equal(kept.mask, svc.mask(saved.id))
    other = svc.history(demo.id, 5)[-1]
    with pytest.raises((ValueError, UserError), match="did not predict slice 5"):
        svc.draft_start(demo.id, 5, "latest", mask_id=other.id, prediction_id=job.id)
    with pytest.raises((ValueError, UserError), match="not both"):
        svc.draft_start(demo.id, first.slice_index, "prediction", mask_id=saved.id, prediction_id=job.id)

    # a viewer sees the queue but cannot take from it or rank it (the service refuses, not a hidden button)
    vic = svc.acting_as(svc.signed_in(make_user(data_dir, "vic", "viewer")))
    assert vic.work_list(demo.id).open
    with pytest.raises(UserError, match="viewer"):
        vic.next_work(demo.id)
    with pytest.raises(UserError, match="viewer"):
        vic.rank_work(demo.id)


def test_two_users_pressing_next_at_once_never_get_the_same_item(tmp_path, database_url):
    """Next is one conditional write per item: six users at once on SQLite and on PostgreSQL each get a
    different item (the six slices nobody corrected, no prediction yet), and a seventh finds none left."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.review import worklist

    svc = Neuroseg(Settings.from_env(tmp_path / "data", database_url), supervise=False)
    try:
        demo = svc.load_demo()
        with svc.sessions.begin() as s:
            for row in s.query(MaskVersion).filter(MaskVersion.dataset_id == demo.id, MaskVersion.slice_index < 6):
                s.delete(row)
        work = svc.rank_work(demo.id)
        assert sorted(i.slice_index for i in work.open) == list(range(6))
        assert {i.source for i in work.open} == {""} and all(i.box == (0, 0, 256, 256) for i in work.open)

        def take(name):
            with svc.sessions.begin() as s:
                return worklist.take(s, demo.id, name)

        with ThreadPoolExecutor(6) as pool:
            taken = list(pool.map(take, [f"user{i}" for i in range(6)]))
        assert None not in taken and len({t.id for t in taken}) == 6
        assert svc.next_work(demo.id, "late") is None
    finally:
        svc.close()
