"""What the Annotate page does to open an edit, for tests that drive the service without the page."""

from __future__ import annotations

from ui.annotation import Draft, StartOption
from ui.annotation import start_options as _start_options


def start_options(svc, dataset_id: int, z: int) -> list[StartOption]:
    return _start_options(svc.history(dataset_id, z), svc.predictions(dataset_id=dataset_id), z)


def new_draft(svc, dataset_id: int, z: int, option: StartOption) -> Draft:
    return Draft.begin(svc.draft_start(dataset_id, z, option.source, mask_id=option.mask_id,
                                       prediction_id=option.prediction_id))
