"""Blockwise prediction: the same result on a 2-worker Dask cluster as in one process, a killed prediction
resumes from its written blocks with an identical result, slices larger than a tile are cut into tiles
and stitched back into the same neurons, and the app's prediction job runs on it."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from storage.records.volumes import Volume, write_volume
from unet.exchange.checkpoint import save_checkpoint
from unet.network.config import preset
from unet.network.model import UNet
from unet.prediction.blocks import BlockJob, finished_blocks, output_path
from unet.prediction.schedule import run_blocks
from unet.training.synthetic import make_synthetic_em

SLICES = (0, 2, 3, 4, 5)


@pytest.fixture
def setup(tmp_path):
    volume, _ = make_synthetic_em((6, 150, 210), np.random.default_rng(7), cell_size=24)
    path = tmp_path / "volume.ome.zarr"
    write_volume(path, iter(volume), volume.shape, volume.dtype)
    torch.manual_seed(3)
    config = preset("tiny")
    checkpoint = save_checkpoint(tmp_path / "model.pt", UNet(config.model),
                                 meta={"kind": "best", "step": 1, "train_config": config.to_dict()})
    return tmp_path, path, checkpoint


def _job(folder, volume, checkpoint) -> BlockJob:
    # one CPU thread per block wherever it runs, so the arithmetic is the same in every process
    return BlockJob(checkpoint=str(checkpoint), volume=str(volume), out=str(folder), slices=SLICES, threads=1)


def _outputs(folder) -> dict[str, np.ndarray]:
    return {name: Volume(output_path(folder, name))[...] for name in ("probabilities", "mask", "instances")}


def test_a_two_worker_dask_cluster_predicts_what_one_process_does(setup):
    tmp_path, volume, checkpoint = setup
    seen_one, seen_two = [], []
    one = run_blocks(_job(tmp_path / "one", volume, checkpoint), (150, 210), workers=1,
                     progress=lambda d, t: seen_one.append((d, t)))
    two = run_blocks(_job(tmp_path / "two", volume, checkpoint), (150, 210), workers=2,
                     progress=lambda d, t: seen_two.append((d, t)))
    assert seen_one == [(i, 5) for i in range(6)]  # the bar counts blocks
    assert seen_two[0] == (0, 5) and seen_two[-1] == (5, 5) and len(seen_two) == 6
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert a["probabilities"].shape == (5, 150, 210) and a["probabilities"].std() > 0
    np.testing.assert_allclose(b["probabilities"], a["probabilities"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b["mask"], a["mask"])
    np.testing.assert_array_equal(b["instances"], a["instances"])
    assert [one[i]["slice"] for i in range(5)] == list(SLICES)

    # given one core (a training runs beside it in the app), two workers asked for run in this process on
    # one torch thread, with the same result
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_blocks(_job(tmp_path / "shared", volume, checkpoint), (150, 210), workers=2, cores=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(_outputs(tmp_path / "shared")["probabilities"], a["probabilities"], rtol=0, atol=1e-6)
    assert {i: m["sha256"] for i, m in one.items()} == {i: m["sha256"] for i, m in two.items()}

    # a training starts beside it after the first block: the rest run on one torch thread
    answers = iter([2, 2])
    asked = []

    def share() -> int:
        asked.append(next(answers, 1))
        return asked[-1]

    try:
        run_blocks(replace(_job(tmp_path / "beside", volume, checkpoint), threads=0), (150, 210), workers=1,
                   share=share)
        assert torch.get_num_threads() == 1 and len(asked) >= 5 and asked[:3] == [2, 2, 1]
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(_outputs(tmp_path / "beside")["probabilities"], a["probabilities"], rtol=0, atol=1e-5)


KILLED_AFTER_TWO = """
import json, os, signal, sys
from unet.prediction.blocks import BlockJob
from unet.prediction.schedule import run_blocks
fields = json.loads(sys.argv[1])
job = BlockJob(**{**fields, "slices": tuple(fields["slices"])})
def progress(done, total):
    if done == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after its second block was written
run_blocks(job, (150, 210), workers=1, progress=progress)
"""


def test_a_prediction_killed_halfway_resumes_and_ends_identical(setup):
    from dataclasses import asdict

    tmp_path, volume, checkpoint = setup
    whole = _job(tmp_path / "whole", volume, checkpoint)
    run_blocks(whole, (150, 210), workers=1)
    killed = _job(tmp_path / "killed", volume, checkpoint)
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO, json.dumps(asdict(killed))], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(finished_blocks(killed)) == [0, 1]
    seen = []
    run_blocks(killed, (150, 210), workers=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 5), (3, 5), (4, 5), (5, 5)]  # it did only the three blocks left
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "killed")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A stack of 6 slices of 150 × 210 with 24-px cells, and a tiny network trained on it for 150 steps
    (a few seconds): tiles must reproduce neurons, which an untrained network does not see."""
    from unet.training.data import TrainData
    from unet.training.train import train

    folder = tmp_path_factory.mktemp("trained")
    volume, labels = make_synthetic_em((6, 150, 210), np.random.default_rng(7), cell_size=24)
    path = folder / "volume.ome.zarr"
    write_volume(path, iter(volume), volume.shape, volume.dtype)
    torch.manual_seed(0)
    train(preset("tiny", steps=150), TrainData.from_stack(volume, labels, [0, 1, 2, 3], [4, 5]), out_dir=folder / "run")
    return path, folder / "run" / "best.pt", labels


def _tiled(folder, volume, checkpoint, slices=(0, 4, 5)) -> BlockJob:
    # tiles of 64² with a 32-px halo: a slice of 150 × 210 is 3 × 4 tiles, the last row and column narrow
    return BlockJob(checkpoint=str(checkpoint), volume=str(volume), out=str(folder), slices=slices, threads=1,
                    tile=64, halo=32)


def test_a_slice_larger_than_a_tile_is_predicted_in_tiles_and_stitched_into_the_same_neurons(tmp_path, trained):
    import hashlib

    from skimage.metrics import variation_of_information

    from unet.training.labels import MEMBRANE, NEURON

    volume, checkpoint, labels = trained
    targets = {4: np.where(labels[4] > 0, NEURON, MEMBRANE).astype(np.uint8)}
    whole = BlockJob(checkpoint=str(checkpoint), volume=str(volume), out=str(tmp_path / "whole"), slices=(0, 4, 5),
                     threads=1)
    reference = run_blocks(whole, (150, 210), workers=1, targets=targets)
    seen = []
    markers = run_blocks(_tiled(tmp_path / "tiled", volume, checkpoint), (150, 210), workers=1, targets=targets,
                         progress=lambda d, t: seen.append((d, t)))
    # a tiled slice's scores: its tiles' scores, weighted by their labelled pixels
    assert markers[0]["scores"] is None and markers[1]["scores"].keys() == reference[1]["scores"].keys()
    assert abs(markers[1]["scores"]["pixel_error"] - reference[1]["scores"]["pixel_error"]) < 1e-3
    assert seen == [(i, 36) for i in range(37)]  # the bar counts tiles: 12 per slice
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "tiled")
    assert (a["mask"] != b["mask"]).mean() < 1e-3  # every tile was normalised as its whole slice
    for z in range(3):
        count = len(np.unique(a["instances"][z]))
        assert count > 20  # the network sees cells
        assert len(np.unique(b["instances"][z])) == count and b["instances"][z].max() == count  # numbered 1…n
        assert sum(variation_of_information(a["instances"][z], b["instances"][z])) < 0.05
        assert markers[z]["sha256"]["instances"] == hashlib.sha256(b["instances"][z].tobytes()).hexdigest()
    # what the tiles left (raw labels, bands, tile markers, statistics) is gone once a slice is stitched
    assert sorted(p.name for p in (tmp_path / "tiled" / "blocks").iterdir()) == ["0.json", "1.json", "2.json"]
    asked = []
    two = run_blocks(_tiled(tmp_path / "two", volume, checkpoint), (150, 210), workers=2,
                     progress=lambda d, t: asked.append(_blocks_asked()))
    assert next(a for a in asked if a is not None)[0] == 36  # with no share, every tile is asked for at once
    c = _outputs(tmp_path / "two")
    for name in c:
        np.testing.assert_array_equal(c[name], b[name])
    assert {i: m["sha256"] for i, m in two.items()} == {i: m["sha256"] for i, m in markers.items()}
    # two workers, then one core's share (a training started beside it): one tile in flight at a time, each
    # slice still stitched once its tiles are done, the same neurons
    answers = iter([2])
    seen, asked = [], []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        asked.append(_blocks_asked())

    run_blocks(replace(_tiled(tmp_path / "beside", volume, checkpoint), threads=0), (150, 210), workers=2,
               share=lambda: next(answers, 1), progress=progress)
    assert seen == [(i, 36) for i in range(37)]
    assert [a[1] for a in asked if a is not None] == [0] * 36  # the one in flight has just ended: none waits
    for name, d in _outputs(tmp_path / "beside").items():
        np.testing.assert_array_equal(d, b[name])


def _blocks_asked() -> tuple[int, int] | None:
    """(blocks asked of the cluster, of which still to do), as the client of a running ``run_blocks`` holds
    them (None: no cluster yet). Called from its progress report, after a block ended and before more are
    asked for."""
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:
        return None
    blocks = [state for key, state in client.futures.items() if str(key).startswith("block-")]
    return len(blocks), sum(state.status == "pending" for state in blocks)


KILLED_AFTER_A_SLICE_OF_TILES = """
import json, os, signal, sys
from unet.prediction.blocks import BlockJob
from unet.prediction.schedule import run_blocks
fields = json.loads(sys.argv[1])
job = BlockJob(**{**fields, "slices": tuple(fields["slices"])})
def progress(done, total):
    if done == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
run_blocks(job, (150, 210), workers=1, progress=progress)
"""


def test_a_tiled_prediction_killed_before_its_stitch_or_between_tiles_resumes_identical(tmp_path, trained):
    from dataclasses import asdict

    volume, checkpoint, _ = trained
    run_blocks(_tiled(tmp_path / "whole", volume, checkpoint), (150, 210), workers=1)
    job = _tiled(tmp_path / "killed", volume, checkpoint)
    # killed when slice 0's last tile is written (its stitch not begun), then again half-way through slice 1
    for at in (12, 18):
        proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_SLICE_OF_TILES, json.dumps(asdict(job)), str(at)],
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL
    assert sorted(finished_blocks(job)) == [0]
    assert len(list((tmp_path / "killed" / "blocks").glob("1-*.json"))) == 6
    seen = []
    run_blocks(job, (150, 210), workers=1, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (18, 36) and seen[-1] == (36, 36)
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "killed")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name])


def test_the_app_predicts_blockwise_and_resumes_a_killed_job(tmp_path, monkeypatch):
    from storage.jobs.queue import terminate
    from storage.service import Neuroseg
    from storage.settings import Settings
    from tests.store.test_jobs import wait_for
    from tests.store.test_starter import tiny_starter

    tiny_starter(tmp_path / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))  # its supervisor notices the dead process
    try:
        info = svc.load_demo()
        start = svc.checkpoint_choices()[0].id
        job = svc.predict(start, info.id, [1, 2, 3])
        terminate(job.pid, signal.SIGKILL)  # killed at once, with its process group (workers included)
        wait_for(lambda: svc.prediction(job.id).status == "FAILED", timeout=60)
        with pytest.raises(Exception, match="only a failed or cancelled one"):
            svc.resume_prediction(svc.predict(start, info.id, [0]).id)
        resumed = svc.resume_prediction(job.id)
        assert resumed.status in ("QUEUED", "RUNNING")
        done = wait_for(lambda: (p := svc.prediction(job.id)).status in ("FINISHED", "FAILED") and p, timeout=180)
        assert done.status == "FINISHED", done.error
        assert done.done == 3 and done.device == "cpu"  # (where it computed: a CPU training shares the cores)
        # how fast this attempt ran: only the slices it predicted itself (the killed one may have written some)
        assert 0 < done.metrics["timing"]["slices"] <= 3 and done.metrics["timing"]["slices_per_s"] > 0
        probs = svc.prediction_output(job.id)
        assert probs.shape == (3, 256, 256) and isinstance(probs, Volume)
        # the three neighbouring slices' instances linked into 3D neurons: every instance is in exactly one
        neurons = svc.prediction_output(job.id, "neurons")[...]
        instances = svc.prediction_output(job.id, "instances")[...]
        assert done.metrics["neurons"]["count"] == len(np.unique(neurons[neurons > 0])) >= 1
        for i in range(3):
            assert len(np.unique(instances[i].astype(np.int64) * 2**32 + neurons[i])) == len(np.unique(instances[i]))
        tiff = svc.prediction_file(job.id, "mask")
        import io

        import tifffile

        with tifffile.TiffFile(io.BytesIO(tiff)) as t:
            assert t.is_imagej and t.series[0].shape == (3, 256, 256)
            np.testing.assert_array_equal(t.asarray(), svc.prediction_output(job.id, "mask")[...])
    finally:
        svc.close()



def test_a_prediction_exports_as_ome_zarr_that_napari_reads(tmp_path, monkeypatch):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from domain.records import UserError
    from storage.service import Neuroseg
    from storage.settings import Settings
    from tests.store.test_jobs import wait_for
    from tests.store.test_starter import tiny_starter

    tiny_starter(tmp_path / "models", monkeypatch)
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))
    try:
        info = svc.load_demo()
        job = svc.predict(svc.checkpoint_choices()[0].id, info.id, [0, 4])
        wait_for(lambda: svc.prediction(job.id).status == "FINISHED", timeout=180)
        (tmp_path / "exports").mkdir()
        monkeypatch.setenv("NEUROSEG_EXPORT_ROOT", str(tmp_path / "exports"))  # off unless an admin names it
        written = svc.export_prediction(job.id, "")
        assert sorted(p.rsplit("/", 1)[1] for p in written) == [
            f"prediction-{job.id}-{name}.ome.zarr" for name in ("instances", "mask", "neurons", "probabilities")]
        node = next(iter(Reader(parse_url(str(tmp_path / "exports" / f"prediction-{job.id}-mask.ome.zarr")))()))
        np.testing.assert_array_equal(np.asarray(node.data[0]), svc.prediction_output(job.id, "mask")[...])
        with pytest.raises(UserError, match="exists already"):
            svc.export_prediction(job.id, str(tmp_path / "exports"))
        with pytest.raises(UserError, match="exports go into"):
            svc.export_prediction(job.id, str(svc.store.root / "x"))
    finally:
        svc.close()


def test_an_output_slice_of_zeros_is_stored_chunk_by_chunk(tmp_path):
    """zarr skips chunks that hold only the fill value unless told otherwise, and the setting does not
    travel with the array: a mask slice that is all membrane must still be readable (not "missing")."""
    from unet.prediction.blocks import create_output, write_slice

    path = tmp_path / "mask.ome.zarr"
    create_output(path, "mask", (2, 700, 600), [0, 1])
    write_slice(path, 0, np.zeros((700, 600), np.uint8))
    write_slice(path, 1, np.full((700, 600), 255, np.uint8))
    stored = Volume(path)
    assert len(list((path / "0" / "c" / "0").rglob("*"))) > 2
    np.testing.assert_array_equal(stored[0], np.zeros((700, 600), np.uint8))
    assert stored[1].min() == 255


def test_the_pipeline_predicts_what_slice_by_slice_does_and_resumes(tmp_path, trained, monkeypatch):
    """On a GPU, whole slices go through a pipeline (reads, several slices per batch, and the host's neurons
    and writes on threads, overlapped): here it is forced on the CPU, against the slice-by-slice path."""
    import unet.prediction.pipeline as pipeline
    import unet.prediction.schedule as schedule
    from unet.prediction.blocks import create_outputs, marker_path
    from unet.training.labels import MEMBRANE, NEURON

    volume, checkpoint, labels = trained
    targets = {4: np.where(labels[4] > 0, NEURON, MEMBRANE).astype(np.uint8)}
    slices = (0, 1, 2, 4, 5)

    def job(name):
        return BlockJob(checkpoint=str(checkpoint), volume=str(volume), out=str(tmp_path / name), slices=slices,
                        threads=1)

    reference = run_blocks(job("plain"), (150, 210), workers=1, targets=targets, pipeline=False)
    a = _outputs(tmp_path / "plain")
    batches = []
    predict = pipeline.predict_slices
    monkeypatch.setattr(pipeline, "predict_slices", lambda model, images, **k: batches.append(len(images)) or
                        predict(model, images, **k))
    monkeypatch.setattr(schedule, "run_block", None)  # (the slice-by-slice path would fail: not taken)
    seen = []
    piped = run_blocks(job("piped"), (150, 210), workers=1, targets=targets, pipeline=True,
                       progress=lambda d, t: seen.append((d, t)))
    assert batches == [5] and seen == [(i, 5) for i in range(6)]
    b = _outputs(tmp_path / "piped")
    np.testing.assert_allclose(b["probabilities"], a["probabilities"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(b["mask"], a["mask"])
    np.testing.assert_array_equal(b["instances"], a["instances"])
    assert piped[3]["scores"]["rand_f"] == pytest.approx(reference[3]["scores"]["rand_f"], abs=1e-6)
    assert [piped[i]["slice"] for i in range(5)] == list(slices) and piped[0]["scores"] is None

    # groups of two read ahead, three host threads, one slice waiting at most; a write that fails on the
    # fourth slice stops the run, leaves no marker for it, and a second run does only what is left
    small = job("small")
    create_outputs(small, (150, 210))
    finish = pipeline.finish_block

    def failing(job, i, prob, target):
        if i == 3:
            raise OSError("no space left on device")
        return finish(job, i, prob, target)

    monkeypatch.setattr(pipeline, "finish_block", failing)
    told = []
    with pytest.raises(OSError, match="no space"):
        pipeline.run_slices(small, list(range(5)), lambda i: None, lambda i, m: told.append(i), together=2,
                            threads=3, ahead=1)
    kept = [i for i in range(5) if marker_path(small, i).exists()]
    assert 3 not in kept and told == sorted(told) and set(told) <= set(kept)
    monkeypatch.setattr(pipeline, "finish_block", finish)
    batches.clear()
    again = []
    pipeline.run_slices(small, list(range(5)), lambda i: None, lambda i, m: again.append(i), together=2, threads=3,
                        ahead=1)
    assert again == kept + [i for i in range(5) if i not in kept] and sum(batches) == 5 - len(kept)
    c = _outputs(tmp_path / "small")
    np.testing.assert_array_equal(c["instances"], a["instances"])
    np.testing.assert_allclose(c["probabilities"], a["probabilities"], rtol=0, atol=1e-5)


def test_a_cancelled_prediction_stops_at_a_block_says_what_it_kept_and_resumes(tmp_path, monkeypatch):
    from sqlalchemy import update

    from domain.records import UserError
    from storage.models import Prediction
    from storage.records import predictions
    from storage.service import Neuroseg
    from storage.settings import PROJECT_ROOT, Settings
    from tests.store.test_jobs import wait_for
    from tests.store.test_starter import tiny_starter
    from unet.prediction.metrics import SCORING

    tiny_starter(tmp_path / "models", monkeypatch)
    settings = Settings.from_env(tmp_path / "data")
    svc = Neuroseg(settings)  # (it registers the starter model)
    try:
        info = svc.load_demo()
        start = svc.checkpoint_choices()[0].id
        # a cancel that reaches a waiting prediction before its process takes it: cancelled at once, and the
        # process, finding it so, does nothing
        job = svc.predict(start, info.id, [0])
        cancelled = svc.cancel_prediction(job.id)
        assert not cancelled.active or cancelled.stopping
        wait_exit_of(job.pid)
        ended = svc.prediction(job.id)
        assert ended.status == "CANCELLED" and ended.error.startswith("cancelled"), ended.error
        assert svc.cancel_prediction(job.id) == ended  # a second click changes nothing

        # a cancel that its process sees at its next block (here: the first report, before any block)
        with svc.sessions.begin() as s:
            row = predictions.submit_prediction(s, start, info.id, [1, 2, 3])
            s.execute(update(Prediction).where(Prediction.id == row.id).values(cancel_requested=Prediction.created))
        env = {**os.environ, "NEUROSEG_DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url}
        done = subprocess.run([sys.executable, "-m", "storage.jobs.predict_worker", "--prediction-id", str(row.id)],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        stopped = svc.prediction(row.id)
        assert stopped.status == "CANCELLED" and not stopped.stopping
        assert stopped.error == "cancelled on request; 0 of 3 blocks are written and kept"
        resumed = svc.resume_prediction(row.id)  # a cancelled one resumes as a failed one does
        assert resumed.status in ("QUEUED", "RUNNING") and not resumed.stopping
        finished = wait_for(lambda: (p := svc.prediction(row.id)).status in ("FINISHED", "FAILED") and p, timeout=180)
        assert finished.status == "FINISHED" and finished.done == 3, finished.error
        assert finished.metrics["scoring"] == SCORING  # (scored by today's definitions)
        with pytest.raises(UserError, match="only a waiting or running one can be cancelled"):
            svc.cancel_prediction(row.id)
    finally:
        svc.close()


def wait_exit_of(pid: int, timeout: float = 120) -> None:
    from tests.app.test_loop_pages import wait_exit

    wait_exit(pid, timeout)
