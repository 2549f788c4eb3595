"""The database schema (typed SQLAlchemy 2 models). Alembic migrations in ``storage/migrations`` create
it; change both together."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from domain.kinds import RunStatus
from domain.records import NotFound


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


Row = TypeVar("Row", bound=Base)


def row_or_missing(session: Session, model: type[Row], ident: int, what: str) -> Row:
    """The row of ``model`` with id ``ident``, or :class:`~domain.records.NotFound` saying "<what> <id> does
    not exist" (deleted meanwhile, or never there): the one way the store looks a row up by a user's id."""
    row = session.get(model, ident)
    if row is None:
        raise NotFound(f"{what} {ident} does not exist")
    return row


ROLES = ("admin", "annotator", "viewer")


#: An id is never handed out again once its row is deleted (SQLite reuses the largest otherwise; migration 0019): names
#: on disk and the audit trail refer to rows by id.
NEVER_REUSED = {"sqlite_autoincrement": True}


class User(Base):
    """Who signs in: a local account (an argon2id hash of its password) or one made at the first single
    sign-on of an identity (``oidc_issuer`` + ``oidc_subject``); the same row either way."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_user_oidc"), NEVER_REUSED)
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str] = mapped_column(String(320), default="")
    role: Mapped[str] = mapped_column(String(16), default="viewer")  # ROLES
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None: signs in by single sign-on only
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    oidc_issuer: Mapped[str | None] = mapped_column(String(500))
    oidc_subject: Mapped[str | None] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    max_queued_runs: Mapped[int] = mapped_column(default=1)  # training runs waiting at once (an admin raises it)
    failed_sign_ins: Mapped[int] = mapped_column(default=0)  # wrong passwords in a row
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # slowed down until then
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_sign_in: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SignIn(Base):
    """A signed-in browser: the SHA-256 of the token its cookie holds (never the token), until it expires
    or signs out."""

    __tablename__ = "sign_ins"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    address: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(16), default="password")  # password | oidc


class SingleSignOn(Base):
    """A single sign-on taken into a session: a digest of the provider's answer (issuer, subject, when it
    was issued, its nonce), kept while such an answer could still be taken. Streamlit keeps that answer in a
    signed cookie for 30 days, and every port of the host receives it: each answer signs in once, fresh."""

    __tablename__ = "single_sign_ons"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    used: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class AuditEvent(Base):
    """One thing someone did or tried: who (the user, and the name as it was), when, what, on what, from
    which address, and whether it was done, refused or failed."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_time", "time"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    username: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str] = mapped_column(String(120), default="")  # "dataset 3", "run 7", "user bob"
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok | refused | failed | asked
    detail: Mapped[str] = mapped_column(Text, default="")
    address: Mapped[str] = mapped_column(String(64), default="")




class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (NEVER_REUSED,)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    z: Mapped[int]
    y: Mapped[int]
    x: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(16))
    source_name: Mapped[str] = mapped_column(String(255))
    pixel_size_nm: Mapped[float | None] = mapped_column(Float)
    sha256: Mapped[str] = mapped_column(String(64))  # of the voxels (OME-Zarr) or of the file (legacy TIFF)
    size_bytes: Mapped[int]
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    notes: Mapped[str] = mapped_column(Text, default="")
    # "ome-zarr" (storage.records.volumes); "tiff" for a volume stored by an earlier version, until converted
    volume_format: Mapped[str] = mapped_column(String(16), default="ome-zarr", server_default="tiff")
    linked_path: Mapped[str | None] = mapped_column(String(1000))  # "link": the stack on the server, read-only
    # frozen held-out slices, [{"slice": z, "mask_id": id}], that every run on the dataset is scored on;
    # changed only explicitly, and each change is a new version (scores compare within a version)
    held_out: Mapped[list[dict[str, int]] | None] = mapped_column(JSON)
    held_out_version: Mapped[int] = mapped_column(default=0, server_default="0")
    default_checkpoint_id: Mapped[int | None]  # the promoted model: Predict and Live start from it
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    owner: Mapped[User | None] = relationship(lazy="joined")
    masks: Mapped[list[MaskVersion]] = relationship(back_populates="dataset", cascade="all, delete-orphan",
                                                    passive_deletes=True)


class MaskVersion(Base):
    __tablename__ = "mask_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "slice_index", "version", name="uq_mask_version"), NEVER_REUSED)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    slice_index: Mapped[int]
    version: Mapped[int]
    kind: Mapped[str] = mapped_column(String(32))
    author: Mapped[str] = mapped_column(String(100), default="")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("mask_versions.id", ondelete="SET NULL"))
    labelled_pixels: Mapped[int]
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    file: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    restored_from_id: Mapped[int | None]  # a restore: the old version it copies
    tools: Mapped[list[str] | None] = mapped_column(JSON)  # domain.kinds.Tool values that made it
    dataset: Mapped[Dataset] = relationship(back_populates="masks")


class Draft(Base):
    """An edit of a slice that is not saved yet, kept as the user paints so that a reload, a new tab or a
    server restart loses nothing. One per slice and owner (a user's name, or a browser without one)."""

    __tablename__ = "drafts"
    __table_args__ = (UniqueConstraint("dataset_id", "slice_index", "owner", name="uq_draft_slice_owner"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    slice_index: Mapped[int]
    owner: Mapped[str] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(16))  # latest | uploaded | prediction | nothing
    source_mask_id: Mapped[int | None]
    latest_id: Mapped[int | None]
    prediction_id: Mapped[int | None]
    kind: Mapped[str] = mapped_column(String(32))
    changed_pixels: Mapped[int]
    file: Mapped[str] = mapped_column(String(255))  # two pages: the mask the edit started from, the edit
    sha256: Mapped[str] = mapped_column(String(64))
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    token: Mapped[str] = mapped_column(String(32), default="", server_default="")  # written with every keep
    tools: Mapped[list[str] | None] = mapped_column(JSON)  # domain.kinds.Tool values that made it so far


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # one training run at a time per device, enforced by the database itself
        Index("uq_one_running_per_device", "device", unique=True,
              sqlite_where=text("status = 'RUNNING'"), postgresql_where=text("status = 'RUNNING'")),
        NEVER_REUSED,
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED.value, index=True)
    kind: Mapped[str] = mapped_column(String(16), default="train", server_default="train")  # train|live|starter
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # datasets and slices for training / validation
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # unet TrainConfig.to_dict()
    device: Mapped[str] = mapped_column(String(32), default="cpu")
    pid: Mapped[int | None]
    pid_started: Mapped[float | None]  # process start time: PIDs are reused
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # when Cancel was pressed
    phase: Mapped[str] = mapped_column(String(120), default="", server_default="")  # what the worker does now
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    parent_checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL", use_alter=True, name="fk_runs_parent_checkpoint"))
    # scores on the held-out slices of each dataset it touched: {dataset id: {version, slices, step,
    # checkpoint_id, metrics}}
    held_out: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    owner: Mapped[User | None] = relationship(lazy="joined")
    masks: Mapped[list[RunMask]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    metrics: Mapped[list[Metric]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    checkpoints: Mapped[list[Checkpoint]] = relationship(cascade="all, delete-orphan", passive_deletes=True,
                                                         foreign_keys="Checkpoint.run_id")


class RunMask(Base):
    """Which mask versions a run trained or validated on (lineage)."""

    __tablename__ = "run_masks"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    mask_version_id: Mapped[int] = mapped_column(ForeignKey("mask_versions.id", ondelete="RESTRICT"),
                                                 primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # train | val


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_key_step", "run_id", "key", "step"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    step: Mapped[int]
    value: Mapped[float]
    time: Mapped[float]  # seconds since the run started


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (NEVER_REUSED,)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))  # best | latest
    file: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    name: Mapped[str] = mapped_column(String(200), default="", server_default="")  # given on the Models page
    notes: Mapped[str] = mapped_column(Text, default="", server_default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (NEVER_REUSED,)
    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    file: Mapped[str] = mapped_column(String(255))  # the probabilities (float32 TIFF, one page per slice)
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"slices": {z: {...}}, "mean": {...}}
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    slices: Mapped[list[int]] = mapped_column(JSON, default=list, server_default="[]")
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED.value,
                                        server_default=RunStatus.FINISHED.value)
    done: Mapped[int] = mapped_column(default=0, server_default="0")  # blocks written so far, of ``total``
    total: Mapped[int] = mapped_column(default=0, server_default="0")  # blocks in all (0: not planned yet)
    phase: Mapped[str] = mapped_column(String(120), default="", server_default="")  # domain.kinds.PredictionStage
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None]
    pid_started: Mapped[float | None]
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")  # name → {file, sha256}
    # how its neurons were made from the map (unet.prediction.postprocess.METHODS; earlier versions: the watershed)
    postprocess: Mapped[str] = mapped_column(String(32), default="watershed", server_default="watershed")
    # the network's answers averaged over the 8 flips of each tile (test-time augmentation)
    tta: Mapped[bool] = mapped_column(Boolean, default=False)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    owner: Mapped[User | None] = relationship(lazy="joined")
    # where it computes, set by its worker as it starts: "cpu", "cuda" or "dask" (None: not started yet, or earlier)
    device: Mapped[str | None] = mapped_column(String(16), default=None)
    # when it was asked to stop (its process stops after the block it is on; Resume goes on from the blocks written)
    cancel_requested: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class LiveSlice(Base):
    """The newest live prediction of a slice: a live session's probabilities (uint8 file under the run's
    folder), the step of the weights and the newest mask version they had learned from."""

    __tablename__ = "live_slices"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    slice_index: Mapped[int] = mapped_column(primary_key=True)
    step: Mapped[int]
    masks_seen: Mapped[int]  # the highest mask version id in its training set when it predicted
    file: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "y0,x0,h,w": only this region is from these weights (a zoomed viewer's, predicted first); None: all of it
    region: Mapped[str | None] = mapped_column(String(64), default=None)


class LiveViewer(Base):
    """Who looks at which slice of a live session (each viewer's slice, and the ones beside it, are
    re-predicted); a viewer not seen for a while is forgotten."""

    __tablename__ = "live_viewers"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    slice_index: Mapped[int]
    seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    region: Mapped[str | None] = mapped_column(String(64), default=None)  # "y0,x0,h,w" on screen; None: all


class WorkItem(Base):
    """An item of a dataset's shared queue of where to work next (issue 29, :mod:`storage.review.worklist`): a
    region of a slice, its score and why, who took it (Next on Annotate) and the mask version that did it."""

    __tablename__ = "work_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    slice_index: Mapped[int]
    y0: Mapped[int]
    x0: Mapped[int]
    h: Mapped[int]
    w: Mapped[int]
    score: Mapped[float] = mapped_column(Float)
    reasons: Mapped[str] = mapped_column(String(255), default="")
    source: Mapped[str] = mapped_column(String(64), default="")  # "prediction 12", "live 7", "" (none yet)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    taken_by: Mapped[str | None] = mapped_column(String(128), default=None)
    taken_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    done_by: Mapped[str | None] = mapped_column(String(128), default=None)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    mask_version_id: Mapped[int | None] = mapped_column(ForeignKey("mask_versions.id", ondelete="SET NULL"))
