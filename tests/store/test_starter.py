"""The starter model that ships with the app: registered once as a checkpoint of the store, offered where a
checkpoint is chosen, the default for a new dataset, never deleted, and refused when its file is damaged."""

from __future__ import annotations

import os
import select

import pytest

from domain.records import UserError
from storage.records import checkpoints, deletion, runs, starter
from storage.service import Neuroseg
from storage.settings import Settings
from ui.training import checkpoint_label, default_checkpoint
from unet.exchange.checkpoint import save_checkpoint
from unet.network.config import preset
from unet.network.model import UNet


def wait_exit(pid: int) -> None:
    fd = os.pidfd_open(pid)
    select.select([fd], [], [])
    os.close(fd)


def tiny_starter(folder, monkeypatch, step: int = 7, **recipe) -> None:
    """A starter of the ``tiny`` preset's network (untrained weights) in ``folder``, which becomes
    $NEUROSEG_STARTER_DIR."""
    config = preset("tiny", **recipe)
    save_checkpoint(folder / "membrane-test.pt", UNet(config.model),
                    meta={"kind": "starter", "step": step, "train_config": config.to_dict(), "trained_on": "nothing"})
    monkeypatch.setenv("NEUROSEG_STARTER_DIR", str(folder))


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A starter of the ``tiny`` preset's network in a folder named by $NEUROSEG_STARTER_DIR."""
    tiny_starter(tmp_path / "models", monkeypatch)
    return tmp_path / "models"


def test_the_server_registers_the_starter_once_and_offers_it(tmp_path, shipped):
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))
    try:
        choices = svc.checkpoint_choices()
        assert [(c.run_kind, c.kind, c.step) for c in choices] == [("starter", "best", 7)]
        assert checkpoint_label(choices[0]).startswith("starter model")
        assert svc.runs() == [] and svc.overview().runs == 0  # not a training run of this lab
        again = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=True)  # a restart: nothing new
        again.close()
        assert [c.id for c in svc.checkpoint_choices()] == [choices[0].id]
        with pytest.raises(UserError, match="ships with the app"):
            svc.delete_checkpoint(choices[0].id)
        with pytest.raises(UserError, match="ships with the app"):
            svc.delete_run(choices[0].run_id)
        assert (tmp_path / "data" / choices[0].file).is_file()
    finally:
        svc.close()


def test_a_new_dataset_predicts_with_the_starter_and_fine_tunes_from_it(tmp_path, shipped):
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))  # a server's start registers the starter …
    svc.close()  # … and this test starts its jobs itself (the supervisor would start them as well)
    try:
        demo = svc.load_demo()
        choices = svc.checkpoint_choices()
        first = default_checkpoint(choices, svc.runs(), demo.id)
        assert first == choices[0].id  # no run on this dataset yet: the starter
        job = svc.predict(first, demo.id, [0, 1])
        wait_exit(job.pid)
        done = svc.prediction(job.id)
        assert done.status == "FINISHED", done.error
        assert svc.prediction_output(job.id).shape == (2, 256, 256)
        with pytest.raises(UserError, match="another network"):  # cpu-quick is wider than this starter
            svc.submit_training([{"dataset_id": demo.id, "slices": [0, 1]}], [], preset("cpu-quick"),
                                parent_checkpoint_id=first)
        run = svc.submit_training([{"dataset_id": demo.id, "slices": [0, 1]}], [], preset("tiny", steps=3),
                                  preset="tiny", parent_checkpoint_id=first)
        wait_exit(run.pid)
        assert svc.run(run.id).status == "FINISHED"
        assert svc.lineage(run.id)[0] == choices[0].run_id
        # now the dataset has a run of its own: that is what Predict starts from
        assert default_checkpoint(svc.checkpoint_choices(), svc.runs(), demo.id) in {
            c.id for c in svc.checkpoints(run.id)}
    finally:
        svc.close()


def test_a_damaged_starter_is_refused_with_a_message(tmp_path, shipped):
    (shipped / "membrane-test.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))
    try:
        assert svc.checkpoint_choices() == []
        assert "cannot be loaded" in svc.starter_note and "bench.starter" in svc.starter_note
    finally:
        svc.close()


def test_no_starter_shipped_is_not_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSEG_STARTER_DIR", str(tmp_path / "nothing-here"))
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))
    try:
        assert svc.starter_note == "" and svc.checkpoint_choices() == []
    finally:
        svc.close()


def test_registration_keys_on_the_file_and_leaves_runs_alone(tmp_path, shipped):
    from storage.db import open_store

    sessions, store = open_store(Settings.from_env(tmp_path / "data"), migrate=True)
    with sessions.begin() as s:
        first = starter.register(s, store)
        assert starter.register(s, store).checkpoint_id == first.checkpoint_id
        assert runs.list_runs(s) == [] and len(runs.list_runs(s, include_starter=True)) == 1
        plan = deletion.plan_run(s, store, runs.list_runs(s, include_starter=True)[0].id)
        assert plan.refusal and "ships with the app" in plan.refusal
    # a new version of the file is a new checkpoint (the old one stays: predictions may use it)
    save_checkpoint(shipped / "membrane-test.pt", UNet(preset("tiny").model), meta={"step": 9})
    with sessions.begin() as s:
        second = starter.register(s, store)
        assert second.checkpoint_id != first.checkpoint_id
        assert len(checkpoints.checkpoints(s)) == 2
