"""What a run, a mask version and a checkpoint can be, and where a job is: enums whose values are the strings
the database stores (a ``StrEnum`` compares equal to its value, so rows written before need no migration),
with the words a page shows for each in one place (``label``)."""

from __future__ import annotations

from enum import StrEnum


class PredictionStage(StrEnum):
    """What a prediction's process is doing (its ``done`` and ``total`` count the blocks of ``PREDICT``)."""

    STARTING = ""  # queued, or loading the model and starting its workers
    PREDICT = "predict"  # blocks through the network, their masks and neuron instances, each written when done
    LINKING = "linking"  # every block written; the slices' neurons linked into 3D neurons


class RunStatus(StrEnum):
    """Where a training run or a prediction is. Predictions use QUEUED, RUNNING, FINISHED, FAILED and CANCELLED."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"  # the worker died or went silent; resume continues from the latest checkpoint

    @property
    def label(self) -> str:
        return {"LOST": "lost (its worker died)"}.get(self.value, self.value.lower())


ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
TERMINAL = frozenset(RunStatus) - ACTIVE
RESUMABLE = frozenset({RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.LOST})


class RunKind(StrEnum):
    """Where a model comes from: a training run, a live session, the starter model that ships with the app,
    or a model imported from a BioImage.IO package."""

    TRAIN = "train"
    LIVE = "live"
    STARTER = "starter"
    IMPORTED = "imported"

    @property
    def label(self) -> str:
        return {"train": "run", "live": "live session", "starter": "starter", "imported": "imported"}[self.value]


class Tool(StrEnum):
    """What changed an edit's pixels; a saved version records the tools that made it."""

    BRUSH = "brush"  # strokes on the canvas (neuron, membrane, eraser)
    ACCEPT_PREDICTION = "accept prediction"  # the live prediction copied in (Accept)
    ACCEPT = "accept"  # a neuron of the prediction, with a ring of membrane
    ACCEPT_CONFIDENT = "accept confident"  # every neuron over a probability threshold
    MERGE = "merge"  # two neighbours made one
    SPLIT = "split"  # one neuron cut in two, by seeds or along a line
    ERASE = "erase"  # a false neuron made membrane or unlabelled
    FILL = "fill"  # a region of equal labels filled
    DONT_KNOW = "don't know"  # a region marked unlabelled


class MaskKind(StrEnum):
    """What a mask version is: labels uploaded with the stack, painted by hand, a scribble (only the painted
    pixels count), a prediction saved as it is, or a prediction corrected by hand."""

    UPLOADED = "uploaded"
    PAINTED = "painted"
    SCRIBBLE = "scribble"
    PREDICTED = "predicted"
    CORRECTED = "predicted→painted"

    @property
    def label(self) -> str:
        return {"predicted→painted": "corrected prediction"}.get(self.value, self.value)


class CheckpointKind(StrEnum):
    """Which weights of a run a checkpoint holds: the best by validation (or, for a live session, the ones
    that predict) and the latest (resumable)."""

    BEST = "best"
    LATEST = "latest"
