"""Neuroseg: the frame and the router. The home page says what Neuroseg does, shows the store and offers
the demo data; every page is listed here (``st.navigation``) and lives in ``pages/``."""

from __future__ import annotations

import streamlit as st

import pages.state as state
from pages.common import can, flash, owner, select_dataset, service, show_flashes
from pages.signin import WAITING, account_menu, keep_sign_in, sign_in_gate, signed_in_user
from storage.service import AlreadyLoaded, UserError, isbi_dir
from ui.text import plain

st.set_page_config(page_title="Neuroseg", page_icon="🧠", layout="wide")


def _load(which: str) -> None:
    svc = service()
    try:
        with st.spinner(f"Loading the {which} dataset …"):
            info = svc.load_demo() if which == "demo" else svc.load_isbi()
    except AlreadyLoaded as exc:
        select_dataset(exc.dataset_id)
        try:  # its name as it is now, shown as text (another user may have renamed it)
            shown = f"**{plain(svc.dataset(exc.dataset_id).name)}** (#{exc.dataset_id})"
        except UserError:
            shown = f"#{exc.dataset_id}"
        flash(f"Not loaded again: the {which} dataset is already loaded as {shown}; it is selected.", "info")
        return
    except UserError as exc:
        flash(f"The {which} dataset was not loaded: {plain(exc)}", "error")
        return
    select_dataset(info.id)
    flash(f"Loaded **{plain(info.name)}** ({info.shape[0]} slices of {info.shape[1]}×{info.shape[2]}, "
          f"{info.labelled_slices} with labels). Open **Annotate** to paint, or **Datasets** to browse it.")


def home() -> None:
    svc = service()
    st.title("Neuroseg")
    st.write(
        "Segment neurons in electron-microscopy stacks with a U-Net. Upload a TIFF stack, paint or correct "
        "the masks of a few slices, train in the background, look at the predictions, correct them and "
        "train again. Every mask version, run and checkpoint is kept."
    )
    show_flashes()
    overview = svc.overview()
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.metric("Datasets", overview.datasets)
    c2.metric("Training runs", overview.runs, help=f"{overview.active_runs} queued or running")
    c3.markdown(f"Compute device  \n**{overview.device}**", help="Where training and prediction run. "
                "A GPU is used when PyTorch finds one.")
    if svc.starter_note:
        st.warning(svc.starter_note, icon=":material/warning:")

    if overview.datasets == 0:
        st.subheader("Try it")
        st.write("The store is empty. Load a dataset to try everything in a minute, or upload your own stack.")
        samples = st.container()
    else:  # (the store has data: the samples stay out of the way)
        samples = st.expander("Sample datasets", icon=":material/science:")
    if not can("create"):
        st.info(f"Your role ({service().actor.role}) can look at everything and export it; an admin can give "
                "you the annotator role to upload, annotate, train and predict.", icon=":material/visibility:")
    b1, b2 = samples.columns(2)
    b1.button("Load demo dataset", on_click=_load, args=("demo",), disabled=not can("create"),
              help="A synthetic EM stack (8 × 256 × 256) "
              "with exact labels, made on the spot.", width="stretch")
    if isbi_dir() is not None:
        b2.button("Load ISBI 2012 sample", on_click=_load, args=("ISBI 2012",), width="stretch",
                  disabled=not can("create"),
                  help="The ISBI 2012 training stack (30 × 512 × 512, with labels), from the folder the server "
                  "keeps it in.")
    else:
        b2.caption("The ISBI 2012 sample appears here when its files are in `../shared/data/isbi2012/` "
                   "(or a folder named by `NEUROSEG_ISBI_DIR`).")

    st.subheader("Pages")
    for page, text in (
        (datasets, "upload stacks and labels, browse slices with their masks, rename, delete"),
        (annotate, "paint neuron and membrane on a slice, keep every version"),
        (train, "train a U-Net in the background and follow it live"),
        (predict, "segment a stack with a checkpoint, look at overlays and errors, export"),
        (runs, "every run with its data, curves and checkpoints; compare runs"),
        (models, "every model with its card; BioImage.IO export and import"),
        *([(admin, "users and roles, the audit trail, disk use and the training queue")] if can("admin") else []),
    ):
        st.page_link(page, label=f"**{page.title}**: {text}", icon=page.icon)


home_page = st.Page(home, title="Home", icon=":material/home:", default=True)
datasets = st.Page("pages/datasets.py", title="Datasets", icon=":material/folder:", url_path="datasets")
annotate = st.Page("pages/annotate.py", title="Annotate", icon=":material/brush:", url_path="annotate")
train = st.Page("pages/train.py", title="Train", icon=":material/model_training:", url_path="train")
predict = st.Page("pages/predict.py", title="Predict", icon=":material/auto_awesome:", url_path="predict")
runs = st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs")
models = st.Page("pages/models.py", title="Models", icon=":material/deployed_code:", url_path="models")
admin = st.Page("pages/admin.py", title="Admin", icon=":material/admin_panel_settings:", url_path="admin")
everything = [home_page, datasets, annotate, train, predict, runs, models, admin]


def frame() -> None:
    """Every run: who is signed in, the navigation, the sign-in gate, the sidebar, then the page."""
    # Nobody signed in: every page's URL leads to the sign-in form (the menu is hidden); the Admin page is
    # listed for admins only (its service calls refuse everyone else anyway).
    signed = signed_in_user()
    nobody = signed is None or signed is WAITING
    page = st.navigation(everything if nobody or can("admin") else everything[:-1],
                         position="sidebar" if not nobody and not signed.must_change_password else "hidden")
    keep_sign_in(signed)  # (after the navigation: the browser knows its page before it answers)
    sign_in_gate(signed)

    with st.sidebar:
        account_menu()
    if page.title != "Annotate":
        in_session = {key: d for key, d in state.drafts_if_any().items() if d.dirty}
        try:
            kept = [(d.dataset_id, d.slice_index) for d in service().drafts_of(owner())]
        except UserError:
            kept = []
        unsaved = sorted(set(in_session) | set(kept))
        if unsaved:
            try:
                names = {d.id: d.name for d in service().datasets()}
            except UserError:
                names = {}
            where = ", ".join(f"slice {z} of {plain(names.get(ds, f'dataset #{ds}'))}" for ds, z in unsaved[:5])
            st.warning(f"Unsaved annotation on {where}{' …' if len(unsaved) > 5 else ''}. It is kept (a reload "
                       "or a new tab finds it): open **Annotate** to save or discard it.", icon=":material/warning:")
    state.count_script_run()
    page.run()


if __name__ == "__main__":  # Streamlit and AppTest run this file as __main__. A multiprocessing child that
    # re-imports its parent's main module runs it as __mp_main__ (a Dask worker started in a process where
    # AppTest ran the app): it must draw nothing, open no store and start no supervisor.
    frame()
