"""Models: every checkpoint worth keeping (the starter model, each run's best and latest, imported
models) with its card (what it trained on, the recipe, held-out scores, parent, size), a name and notes,
BioImage.IO export and import, and deletion."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from domain.kinds import RunKind
from pages.common import attempt, can, data_table, release_uploads, start_page
from storage.service import NAME_MAX
from ui.figures import METRIC_NAMES
from ui.text import plain
from ui.training import checkpoint_label

MODEL_PICK = "model_pick"  # (this page's own key: the picker)
SHOWN = "model_shown"  # (this page's own key: the model shown, also the one just imported)
svc = start_page("Models")

with st.popover("Import a BioImage.IO model", icon=":material/upload:", disabled=not can("create")):
    with st.form("import_model", clear_on_submit=True):
        package = st.file_uploader("A BioImage.IO package (.zip): one exported by Neuroseg, or another tool's "
                                   "TorchScript model of EM boundaries or foreground", type=["zip"],
                                   key="import_model_file")
        go = st.form_submit_button("Import", type="primary")
    if go and package is not None:
        with st.spinner("Checking the package (its validation and its own model test) …"):
            def imported(model) -> str:
                release_uploads(package)  # (stored: the server's memory is free of it)
                st.session_state[SHOWN] = model.checkpoint_id
                return f"Imported **{plain(model.name)}** as run {model.run_id}: Predict offers it."

            attempt(lambda: svc.import_model(package, package.name), imported,
                    failed=lambda exc: f"**{plain(package.name)}** was not imported: {plain(exc)}")

models = svc.checkpoint_choices()
if not models:
    st.info("No model yet: train a run on **Train**, or import a BioImage.IO package.")
    st.stop()
owners = {r.id: r.owner for r in svc.runs()}
data_table([{"model": m.id, "name": m.name, "what": checkpoint_label(m),
               "kind": m.run_kind.label if m.run_kind != RunKind.TRAIN else m.kind,
               "run": m.run_id, "step": m.step, "owner": owners.get(m.run_id) or "—"} for m in models],
             hide_index=True, key="models_table")

by_id = {m.id: m for m in models}
# The picker's options do not say the models' names, and the model shown is kept apart from it: the browser
# sends a picker's choice as its option's words, so a model renamed was no option any more, and the next click
# edited, exported or deleted the newest model instead of the one on screen (a form sent meanwhile was lost).
shown = st.session_state.get(SHOWN)
shown = shown if shown in by_id else models[0].id
if st.session_state.get(MODEL_PICK) != shown:
    st.session_state[MODEL_PICK] = shown


def _picked() -> None:
    st.session_state[SHOWN] = st.session_state[MODEL_PICK]


chosen = by_id[st.selectbox("Model", list(by_id), key=MODEL_PICK, on_change=_picked,
                            format_func=lambda i: f"#{i} · {checkpoint_label(replace(by_id[i], name=''))}")]
st.session_state[SHOWN] = chosen.id
card = svc.model_card(chosen.id)
run = card["run"]

st.subheader(plain(chosen.name or checkpoint_label(chosen)))
facts = st.columns(4)
facts[0].metric("Run", f"#{run.id}", help=f"{run.kind} run, {run.status}")
facts[1].metric("Step", f"{chosen.step:,}")
size = card["size_bytes"]
facts[2].metric("Size", f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB")
parent = card["parent"]
facts[3].metric("Parent", f"run {parent['run_id']}" if parent else "—",
                help=f"fine-tuned from checkpoint {parent['checkpoint_id']}" if parent else "trained from scratch")
if card["source"]:
    st.caption(f"Source: {plain(card['source'])}")
if chosen.metrics:
    st.caption("Validation: " + " · ".join(f"{METRIC_NAMES.get(k, k)} {v:.4f}"
                                           for k, v in sorted(chosen.metrics.items()) if isinstance(v, int | float)))

refused = svc.refusal("manage", "checkpoint", chosen.id)  # (shown before typing; the service checks again)
with st.form(f"model_name_{chosen.id}"):
    name = st.text_input("Name", chosen.name, max_chars=NAME_MAX, disabled=bool(refused))
    notes = st.text_area("Notes", chosen.notes, disabled=bool(refused))
    if refused:
        st.caption(refused)
    if st.form_submit_button("Save name and notes", disabled=bool(refused)):
        attempt(lambda: svc.update_model(chosen.id, name=name, notes=notes), lambda _: "Name and notes saved.")

left, right = st.columns(2)
with left:
    st.markdown("**Trained on** (the exact mask versions)")
    trained_on = svc.run_masks(run.id)
    if trained_on:
        data_table([{"role": m.role, "dataset": m.dataset, "slice": m.slice, "version": m.version, "kind": m.kind,
                       "author": m.author} for m in trained_on], hide_index=True, height=220, key="model_masks")
    else:
        st.caption("Recorded in its model card (the starter model) or its package (an import)."
                   if run.kind in (RunKind.STARTER, RunKind.IMPORTED) else "No mask versions recorded.")
    if card["held_out"]:
        st.markdown("**Held-out scores**")
        data_table([{"dataset": ds, "measured on slices": ", ".join(map(str, entry["slices"])) or "none",
                       "left out (it trained on them)": ", ".join(map(str, entry["seen"])),
                       **{k: round(v, 4) for k, v in entry["metrics"].items() if isinstance(v, int | float)}}
                      for ds, entry in card["held_out"].items()], hide_index=True, key="model_held_out")
        if any(entry["seen"] for entry in card["held_out"].values()):
            st.caption("Held-out slices this model, or a model it was fine-tuned from, trained on "
                       "are left out of its score: a score on them says nothing about unseen data.")
with right:
    st.markdown("**Recipe**")
    st.json(card["recipe"], expanded=False)

actions = st.columns([2, 2, 1])
packaged = st.session_state.get(f"bioimageio_{chosen.id}")
if packaged is None:
    source = svc.export_source(chosen.id)
    SYNTHETIC = "a synthetic EM slice (nothing of your data leaves)"
    choices = [SYNTHETIC] + ([f"a crop of slice {source[2]} of {plain(source[0])} (it leaves the lab with the "
                              "package: mind unpublished data)"] if source else [])
    picked = st.radio("The package's test image and cover picture", choices, key=f"pack_source_{chosen.id}",
                      help="A BioImage.IO package carries a test input, the model's answer to it and a cover "
                           "picture. Anyone you give the package to sees them.")
    if actions[0].button("Export as BioImage.IO package", key=f"pack_{chosen.id}", disabled=not can("export"),
                         help="Build, validate (bioimageio.spec) and test (bioimageio.core) a package that ilastik, "
                              "deepImageJ and napari run"):
        with st.spinner("Packaging, validating and testing …"):
            attempt(lambda: svc.export_model(chosen.id, with_data=picked != SYNTHETIC),
                    lambda packaged: st.session_state.update({f"bioimageio_{chosen.id}": packaged}),
                    failed=lambda exc: f"Not exported: {plain(exc)}")
else:
    actions[0].download_button("Download package (.zip)", packaged[0], file_name=packaged[1], type="primary",
                               key=f"dl_pack_{chosen.id}", on_click="ignore",
                               help="Validated by bioimageio.spec; model test passed in bioimageio.core")
actions[1].download_button("Download checkpoint (.pt)", lambda: svc.checkpoint_bytes(chosen.id), on_click="ignore",
                           file_name=f"run-{run.id}-{chosen.kind}.pt", key=f"dl_model_{chosen.id}")
refused = svc.refusal("manage", "checkpoint", chosen.id)  # (the service checks the call again)
with actions[2].popover("Delete", disabled=run.active or run.kind == RunKind.STARTER or bool(refused),
                        help=refused or None):
    st.warning(f"Delete model #{chosen.id} ({plain(checkpoint_label(chosen))}) and the predictions made with it?")
    if st.button("Yes, delete it", key=f"del_model_{chosen.id}", type="primary"):
        attempt(lambda: svc.delete_checkpoint(chosen.id), lambda removed: f"Deleted model #{chosen.id}: "
                f"{removed.describe()}.")
