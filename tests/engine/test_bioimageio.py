"""Models that travel: a checkpoint exported as a BioImage.IO package passes ``bioimageio.spec``'s
validation and ``bioimageio.core``'s model test (offline), its TorchScript weights give what the app's
own inference gives, and the package read back predicts exactly what the checkpoint does (the command
line too). An import checks a package with our own code (its files and their sha256, our model on its test
tensors, another tool's TorchScript in :mod:`unet.exchange.torchscript_guard`'s child process); hostile packages
are in ``test_hostile_packages.py``."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unet.exchange.bioimageio import (
    ISBI_CITE,
    UNET_CITE,
    ExportInfo,
    PackageError,
    export_package,
    spec_name,
    validate,
)
from unet.exchange.checkpoint import load_checkpoint, save_checkpoint
from unet.exchange.foreign_model import ForeignModel
from unet.exchange.package_reader import load_package
from unet.network.config import ModelConfig
from unet.network.model import UNet
from unet.prediction.infer import predict_slice
from unet.training.synthetic import make_synthetic_em

pytest.importorskip("bioimageio.core", reason="bioimageio.core is in requirements.txt")


@pytest.fixture(scope="module")
def stack():
    volume, _ = make_synthetic_em((2, 200, 232), np.random.default_rng(4), cell_size=18)
    return volume


@pytest.fixture(scope="module", params=["same", "valid"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(depth=2, initial_features=4, padding=request.param, batch_norm=True)
    model = UNet(config)
    with torch.no_grad():  # batch-norm statistics that are not the identity, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(f"ck-{request.param}") / "best.pt"
    save_checkpoint(path, model, meta={"step": 7, "kind": "best"})
    return load_checkpoint(path)


def test_an_exported_package_passes_the_spec_and_the_core_model_test(checkpoint, stack, tmp_path):
    out = tmp_path / "model.zip"
    info = ExportInfo("Neuroseg test model", "A tiny U-Net for EM membranes.", authors=["Ann Example"],
                      cite=[UNET_CITE, ISBI_CITE], pixel_size_nm=4.0)
    result = export_package(checkpoint, stack[0], info, out)
    assert result.valid and result.tested, result.details
    again = validate(out)  # read back from the file handed out
    assert again.valid and again.tested, again.details
    names = set(zipfile.ZipFile(out).namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "neuroseg_unet.py", "test_input.npy",
            "test_output.npy", "cover.png", "README.md"} <= names
    rdf = zipfile.ZipFile(out).read("rdf.yaml").decode()
    assert "zero_mean_unit_variance" in rdf and "sigmoid" in rdf and "10.3389/fnana.2015.00142" in rdf
    assert "Ann Example" in rdf and "NeurosegUNet" in rdf


def test_torchscript_weights_give_the_apps_own_inference_and_the_package_round_trips(checkpoint, stack, tmp_path):
    out = tmp_path / "model.zip"
    export_package(checkpoint, stack[0], ExportInfo("Round trip model", "A tiny U-Net."), out, run_test=False)
    scripted = torch.jit.load(io.BytesIO(zipfile.ZipFile(out).read("weights_torchscript.pt")))
    model = checkpoint.build_model("cpu")
    ours = predict_slice(model, stack[1])  # the app's inference: normalise, tile, blend, sigmoid
    package = ForeignModel(scripted, checkpoint.model_config, {"sigmoid": True})  # logits in, as ours
    theirs = predict_slice(package, stack[1])  # the package's weights
    np.testing.assert_allclose(theirs, ours, atol=1e-5)

    back = load_package(out)  # export → read back → predict: identical
    assert back.model_config == checkpoint.model_config
    np.testing.assert_array_equal(predict_slice(back.build_model("cpu"), stack[1]), ours)


# the library tests above cover both paddings; the command line adds no padding logic of its own, so its
# three processes (each importing torch and bioimageio) run for one padding only, to keep CI short
@pytest.mark.parametrize("checkpoint", ["valid"], indirect=True)
def test_the_command_line_exports_and_predicts_with_a_package(checkpoint, stack, tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    ck = tmp_path / "ck.pt"
    save_checkpoint(ck, checkpoint.build_model("cpu"), meta=checkpoint.meta)
    done = subprocess.run([sys.executable, "-m", "unet", "export", "--checkpoint", str(ck), "--volume",
                           str(tmp_path / "stack.tif"), "--out", str(tmp_path / "m.zip"), "--author", "Bo"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bioimageio.spec valid, bioimageio.core model test passed" in done.stdout
    for how, source in (("--model", tmp_path / "m.zip"), ("--checkpoint", ck)):
        run = subprocess.run([sys.executable, "-m", "unet", "predict", how, str(source), "--volume",
                              str(tmp_path / "stack.tif"), "--out", str(tmp_path / how.strip("-")), "--no-instances"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "model" / "probabilities.tif"),
                                  tifffile.imread(tmp_path / "checkpoint" / "probabilities.tif"))


def test_a_package_that_is_not_ours_or_not_a_package_is_refused_with_the_reason(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(PackageError, match="not a zip file"):
        load_package(tmp_path / "junk.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(PackageError, match=r"no rdf\.yaml"):
        load_package(tmp_path / "empty.zip")
    with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as z:
        z.writestr("rdf.yaml", "type: model\nformat_version: 0.5.4\nweights:\n  torchscript:\n    source: w.pt\n")
    with pytest.raises(PackageError, match="not exported by Neuroseg"):
        load_package(tmp_path / "foreign.zip")


def test_a_description_the_spec_refuses_is_a_clear_error_and_writes_nothing(checkpoint, stack, tmp_path):
    with pytest.raises(PackageError, match=r"the package description is not valid: .*should match pattern '\^10"):
        export_package(checkpoint, stack[0], ExportInfo("A model", "d", cite=[("x", "no DOI")]), tmp_path / "m.zip")
    assert list(tmp_path.iterdir()) == []
    assert spec_name("m") == "Neuroseg U-Net" and spec_name("m", "Run 3") == "Run 3"  # (a name the spec refuses:
    assert spec_name("Membranes <b>ok</b> ✓") == "Membranes b ok b"  # the default; its characters only)
    assert len(spec_name("x" * 300)) == 128


def test_the_app_exports_the_starter_model_for_the_signed_in_user(tmp_path, monkeypatch):
    from storage.service import Neuroseg
    from storage.settings import Settings
    from tests.lab.test_accounts import user

    monkeypatch.delenv("NEUROSEG_ADMIN_PASSWORD", raising=False)
    svc = Neuroseg(Settings.from_env(tmp_path / "data"))  # the server's start registers the starter model
    try:
        vic = user(svc, "vic", "viewer")  # looking and exporting is a viewer's right
        svc.load_demo()
        starter = next(c for c in svc.checkpoint_choices() if c.run_kind == "starter")
        data, name = svc.acting_as(vic).export_model(starter.id)
    finally:
        svc.close()
    assert name == "neuroseg-starter-best.bioimageio.zip" or name.startswith("neuroseg-starter-")
    package = tmp_path / name
    package.write_bytes(data)
    result = validate(package)
    assert result.valid and result.tested, result.details
    rdf = zipfile.ZipFile(package).read("rdf.yaml").decode()
    assert "vic" in rdf and "10.3389/fnana.2015.00142" in rdf  # the signed-in author; the ISBI data cited
    card = zipfile.ZipFile(package).read("README.md").decode()
    convention = card.split("## Drawing convention")[1]  # ISBI's labels sit above the membranes: a consumer
    assert "px above" in convention and "move each answer back" in convention  # must know where it draws
    assert [(r.username, r.action, r.outcome) for r in svc.audit_trail(action="export model")] == [
        ("vic", "export model", "ok")]
    back = load_package(package)
    assert back.model_config.initial_features == 8  # the starter's width


# --- import ------------------------------------------------------------------------------------------------
def _rezip(source: Path, target: Path, change) -> Path:
    """A copy of a package with ``change(name, data) -> (name, data) | None`` applied to each member."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            changed = change(info.filename, src.read(info))
            if changed is not None:
                dst.writestr(changed[0], changed[1])
    return target


def small_export(folder: Path, image: np.ndarray) -> Path:
    """A tiny U-Net (same padding, batch norm) exported as a package into ``folder``: its path."""
    torch.manual_seed(1)
    model = UNet(ModelConfig(depth=2, initial_features=4, padding="same", batch_norm=True))
    save_checkpoint(folder / "best.pt", model, meta={"step": 3, "kind": "best"})
    out = folder / "model.zip"
    export_package(load_checkpoint(folder / "best.pt"), image, ExportInfo("Round trip model", "A tiny U-Net."), out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stack):
    return small_export(tmp_path_factory.mktemp("exported"), stack[0])


@pytest.fixture
def service(tmp_path):
    from storage.service import Neuroseg
    from storage.settings import Settings

    svc = Neuroseg(Settings.from_env(tmp_path / "data"), supervise=False)
    yield svc
    svc.close()


def _nothing_left(svc) -> None:
    assert svc.runs() == [] and svc.checkpoint_choices() == []
    assert not (svc.store.root / "runs").exists() or list((svc.store.root / "runs").iterdir()) == []
    assert not (svc.store.root / "tmp").exists() or list((svc.store.root / "tmp").iterdir()) == []


def test_export_import_predict_gives_identical_probabilities(service, exported, stack):
    from tests.lab.test_accounts import user

    ann = user(service, "ann", "annotator")
    with open(exported, "rb") as fh:
        imported = service.acting_as(ann).import_model(fh, exported.name)
    run = service.run(imported.run_id)
    assert run.kind == "imported" and run.owner == "ann" and run.status == "FINISHED"
    choice = next(c for c in service.checkpoint_choices() if c.id == imported.checkpoint_id)
    from unet.exchange.checkpoint import load_checkpoint as load

    stored = load(service.store.abspath(choice.file))
    original = load_package(exported)
    np.testing.assert_array_equal(predict_slice(stored.build_model("cpu"), stack[1]),
                                  predict_slice(original.build_model("cpu"), stack[1]))
    assert ("ann", "import model", "ok") in [(r.username, r.action, r.outcome) for r in service.audit_trail()]


def test_a_package_zipped_with_its_folder_is_imported(service, exported, tmp_path):
    """Some tools zip the package's folder: its files lie one level down, beside its rdf.yaml."""
    nested = _rezip(exported, tmp_path / "nested.zip", lambda n, d: (f"model/{n}", d))
    with open(nested, "rb") as fh:
        imported = service.import_model(fh, nested.name)
    assert imported.name == "Round trip model" and service.run(imported.run_id).status == "FINISHED"
    assert load_package(nested).model_config == load_package(exported).model_config


def test_an_imported_package_of_ours_is_a_start_for_training_and_live(service, exported, monkeypatch):
    from unet.network.config import TrainConfig

    monkeypatch.setattr("storage.jobs.queue.start_queued", lambda *a, **k: [])  # recorded, not started
    with open(exported, "rb") as fh:
        imported = service.import_model(fh, exported.name)
    demo = service.load_demo()
    config = TrainConfig.from_dict(service.run(imported.run_id).config)
    run = service.submit_training([{"dataset_id": demo.id, "slices": [0, 1]}], [], config, preset="tiny",
                                  parent_checkpoint_id=imported.checkpoint_id)
    assert run.parent_checkpoint_id == imported.checkpoint_id and run.status == "QUEUED"
    service.cancel_run(run.id)
    session, what = service.live_start(demo.id, imported.checkpoint_id, "user:1")
    assert what == "started" and session.run.parent_checkpoint_id == imported.checkpoint_id


def _rdf_edit(edit):
    import yaml

    def change(name, data):
        if name == "rdf.yaml":
            rdf = yaml.safe_load(data)
            edit(rdf)
            return name, yaml.safe_dump(rdf).encode()
        return name, data

    return change


def _three_d(rdf):
    for tensor in (*rdf["inputs"], *rdf["outputs"]):
        tensor["axes"].insert(2, {"type": "space", "id": "z", "size": 8})


def _two_inputs(rdf):
    import copy

    # (a deep copy: yaml.safe_dump writes an object met twice as an anchor and an alias, which an import refuses)
    rdf["inputs"].append({**copy.deepcopy(rdf["inputs"][0]), "id": "second"})


def _onnx_only(rdf):
    rdf["weights"] = {"onnx": {"source": "weights.onnx", "opset_version": 17}}


def _wrong_output(rdf):
    for tensor in rdf["outputs"]:
        tensor["test_tensor"].pop("sha256", None)


class _Call:
    """Unpickled, this would call print (weights_only refuses it before)."""

    def __reduce__(self):
        return print, ("a pickled call ran",)


def _new_weights(package: Path, make):
    """The state-dict weights replaced by ``make(state)``'s bytes, with their sha256 in rdf.yaml (so that only
    what they are is refused)."""
    import hashlib

    import yaml

    with zipfile.ZipFile(package) as z:
        source = yaml.safe_load(z.read("rdf.yaml"))["weights"]["pytorch_state_dict"]["source"]
    new = {}

    def change(name, data):
        if name == source:
            new["data"] = make(torch.load(io.BytesIO(data), weights_only=True))
            new["sha256"] = hashlib.sha256(new["data"]).hexdigest()
            return name, new["data"]
        return name, data

    def rdf(name, data):
        if name == "rdf.yaml":
            description = yaml.safe_load(data)
            description["weights"]["pytorch_state_dict"]["sha256"] = new["sha256"]
            return name, yaml.safe_dump(description).encode()
        return name, data

    return change, rdf


def _inflated(state):  # 64 MB more of zeros, its records deflated: about 100 kB
    state = {**state, "padding": torch.zeros(16 << 20)}
    plain, packed = io.BytesIO(), io.BytesIO()
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return packed.getvalue()


def _pickled_call(state):
    out = io.BytesIO()
    torch.save({**state, "call": _Call()}, out)
    return out.getvalue()


@pytest.mark.parametrize(("case", "message"), [
    ("not a zip", "not a zip file"),
    ("outside", "member outside itself: '../evil.txt'"),
    ("absolute", "member outside itself: '/etc/evil'"),
    ("bomb", "a zip bomb"),
    ("small bombs", r"the zip unpacks to .* \(a zip bomb"),
    ("two rdfs", "two members for 'rdf.yaml'"),
    ("inflated weights", "its weights unpack to .* more than its network's"),
    ("pickled call", "its weights are not plain tensors"),
    ("no rdf", "no rdf.yaml in it"),
    ("3-D", "3 space axes .*a 3-D model"),
    ("two inputs", "2 inputs and 1 outputs"),
    ("onnx", r"weights \(onnx\) are neither TorchScript nor a PyTorch state dict"),
    ("fails its test", "fails its own model test"),
    ("changed file", "'test_output.npy' is not the file its rdf.yaml describes"),
])
def test_each_refused_package_says_what_was_found_and_leaves_nothing(service, exported, tmp_path, case, message):
    bad = tmp_path / "bad.zip"
    if case == "not a zip":
        bad.write_bytes(b"PK but not really a zip")
    elif case in ("outside", "absolute"):
        _rezip(exported, bad, lambda n, d: (n, d))
        with zipfile.ZipFile(bad, "a") as z:
            z.writestr("../evil.txt" if case == "outside" else "/etc/evil", "x")
    elif case == "bomb":
        _rezip(exported, bad, lambda n, d: (n, d))
        with zipfile.ZipFile(bad, "a", zipfile.ZIP_DEFLATED) as z:
            z.writestr("zeros.bin", bytes(64 << 20))  # 64 MB of zeros: about 64 kB packed
    elif case == "small bombs":  # each member under the rule for one member, all together over the rule for all
        _rezip(exported, bad, lambda n, d: (n, d))
        with zipfile.ZipFile(bad, "a", zipfile.ZIP_DEFLATED) as z:
            for i in range(120):  # (120 MiB from about 500 kB, the package with them)
                z.writestr(f"zeros{i}.bin", bytes(1 << 20))
    elif case == "two rdfs":  # the second one is what unpacking keeps on disk, the first what a zip reader takes
        _rezip(exported, bad, lambda n, d: (n, d))
        with zipfile.ZipFile(bad, "a") as z:
            z.writestr("./rdf.yaml", z.read("rdf.yaml"))
    elif case in ("inflated weights", "pickled call"):
        weights, rdf = _new_weights(exported, _inflated if case == "inflated weights" else _pickled_call)
        staged = _rezip(exported, tmp_path / "staged.zip", weights)
        _rezip(staged, bad, rdf)
    elif case == "no rdf":
        _rezip(exported, bad, lambda n, d: None if n == "rdf.yaml" else (n, d))
    elif case == "3-D":
        _rezip(exported, bad, _rdf_edit(_three_d))
    elif case == "two inputs":
        _rezip(exported, bad, _rdf_edit(_two_inputs))
    elif case == "onnx":
        _rezip(exported, bad, _rdf_edit(_onnx_only))
    elif case == "changed file":  # its sha256 in rdf.yaml still that of the original
        _rezip(exported, bad, lambda n, d: (n, d[:-4] + bytes(4)) if n == "test_output.npy" else (n, d))
    elif case == "fails its test":
        edit = _rdf_edit(_wrong_output)

        def change(name, data):
            if name == "test_output.npy":
                buffer = io.BytesIO()
                np.save(buffer, np.load(io.BytesIO(data)) * 0.5)  # not what the model gives
                return name, buffer.getvalue()
            return edit(name, data)

        _rezip(exported, bad, change)
    from storage.service import UserError

    with open(bad, "rb") as fh, pytest.raises(UserError, match=message):
        service.import_model(fh, bad.name)
    _nothing_left(service)
    assert [r.outcome for r in service.audit_trail(action="import model")] == ["failed"]


def test_the_models_page_imports_exports_names_and_deletes_a_model(app_data_dir, exported, tmp_path):
    from tests.app.test_pages import app, texts

    at = app("Models")
    at.file_uploader(key="import_model_file").upload("model.zip", exported.read_bytes(), "application/zip")
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception, at.exception
    assert "Imported **Round trip model** as run" in texts(at.success)
    bad = _rezip(exported, tmp_path / "bad.zip", _rdf_edit(_three_d))
    at.file_uploader(key="import_model_file").upload("bad.zip", bad.read_bytes(), "application/zip")
    next(b for b in at.button if b.label == "Import").click().run()
    assert "**bad.zip** was not imported: " in texts(at.error) and "a 3-D model" in texts(at.error)

    # the card of the imported model: a name and notes, an export that passes its checks, deletion
    imported = int(at.selectbox(key="model_pick").value)
    at.file_uploader(key="import_model_file").upload("again.zip", exported.read_bytes(), "application/zip")
    next(b for b in at.button if b.label == "Import").click().run()  # (a newer model, listed first)
    assert int(at.selectbox(key="model_pick").value) != imported
    at.selectbox(key="model_pick").select(imported).run()
    picker = list(at.selectbox(key="model_pick").options)
    form_name = next(t for t in at.text_input if t.label == "Name")
    form_name.set_value("Membranes from the round trip")
    next(t for t in at.text_area if t.label == "Notes").set_value("exported, imported, the same")
    next(b for b in at.button if b.label == "Save name and notes").click().run()
    assert "Name and notes saved." in texts(at.success)
    assert "Membranes from the round trip" in at.dataframe[0].value["name"].tolist()
    # the browser sends the picker's choice as its words: a rename changed them, and the next click edited,
    # exported or deleted the newest model instead; the picker's words do not name the models
    assert list(at.selectbox(key="model_pick").options) == picker
    at.run()
    assert int(at.selectbox(key="model_pick").value) == imported
    next(t for t in at.text_area if t.label == "Notes").set_value("notes edited after the rename")
    next(b for b in at.button if b.label == "Save name and notes").click().run()
    assert int(at.selectbox(key="model_pick").value) == imported
    from storage.service import Neuroseg
    from storage.settings import Settings

    store = Neuroseg(Settings.from_env(app_data_dir), supervise=False)
    try:
        assert next(m for m in store.checkpoint_choices() if m.id == imported).notes == "notes edited after the rename"
    finally:
        store.close()
    next(b for b in at.button if b.label == "Export as BioImage.IO package").click().run()
    assert not at.exception, at.exception
    assert any(getattr(b, "label", "") == "Download package (.zip)" for b in at.get("download_button"))
    next(b for b in at.button if b.label == "Yes, delete it").click().run()
    assert f"Deleted model #{imported}" in texts(at.success)


class _Boundary(torch.nn.Module):
    """Another tool's model: a membrane (boundary) probability, sigmoid inside, no post-processing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = UNet(ModelConfig(depth=2, initial_features=4, padding="same"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - torch.sigmoid(self.net(x))


def _scale_range(x: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    a, b = np.percentile(x, (lo, hi))
    return ((x - a) / (b - a + 1e-6)).astype(np.float32)


def torchscript_package(folder: Path, model_file: Path, raw: np.ndarray, out: np.ndarray,
                        name: str = "Another tools boundary model") -> Path:
    """Another tool's package around a saved TorchScript file: percentile scaling in, a boundary map out,
    ``raw`` (Y×X) and ``out`` (1×1×Y×X) as its test tensors; the zip's path."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    np.save(folder / "in.npy", raw[None, None].astype(np.float32))
    np.save(folder / "out.npy", out)
    (folder / "README.md").write_text("# Boundaries\n")
    size = bio.ParameterizedSize(min=16, step=4)
    description = bio.ModelDescr(
        name=name, description="membranes", authors=[bio.Author(name="Someone")],
        cite=[bio.CiteEntry(text="a paper", doi=bio.Doi("10.1000/xyz123"))], license=bio.LicenseId("MIT"),
        documentation=bio.FileDescr(source=folder / "README.md"),
        inputs=[bio.InputTensorDescr(
            id=bio.TensorId("image"), test_tensor=bio.FileDescr(source=folder / "in.npy"),
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("em")]),
                  bio.SpaceInputAxis(id=bio.AxisId("y"), size=size), bio.SpaceInputAxis(id=bio.AxisId("x"), size=size)],
            preprocessing=[bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
                axes=[bio.AxisId("y"), bio.AxisId("x")], min_percentile=1.0, max_percentile=99.0))])],
        outputs=[bio.OutputTensorDescr(
            id=bio.TensorId("boundaries"), test_tensor=bio.FileDescr(source=folder / "out.npy"),
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("boundary")]),
                  bio.SpaceOutputAxis(id=bio.AxisId("y"), size=bio.SizeReference(tensor_id=bio.TensorId("image"),
                                                                                 axis_id=bio.AxisId("y"))),
                  bio.SpaceOutputAxis(id=bio.AxisId("x"), size=bio.SizeReference(tensor_id=bio.TensorId("image"),
                                                                                 axis_id=bio.AxisId("x")))])],
        weights=bio.WeightsDescr(torchscript=bio.TorchscriptWeightsDescr(
            source=model_file, pytorch_version=bio.Version(torch.__version__.split("+")[0]))),
    )
    target = folder / f"{model_file.stem}.zip"
    save_bioimageio_package(description, output_path=target)
    return target


@pytest.fixture(scope="module")
def foreign_package(tmp_path_factory, stack):
    folder = tmp_path_factory.mktemp("foreign")
    model = _Boundary().eval()
    torch.jit.script(model).save(str(folder / "model.pt"))
    raw = stack[0][:64, :64].astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(_scale_range(raw)[None, None])).numpy()
    target = torchscript_package(folder, folder / "model.pt", raw, out)
    assert validate(target).tested
    return target, model


def test_another_tools_torchscript_package_predicts_here_and_cannot_be_fine_tuned(service, foreign_package, stack):
    from storage.service import UserError
    from unet.exchange.checkpoint import load_checkpoint as load
    from unet.network.config import preset

    package, model = foreign_package
    with open(package, "rb") as fh:
        imported = service.import_model(fh, package.name)
    run = service.run(imported.run_id)
    assert run.kind == "imported" and run.spec["weights"] == "torchscript"
    choice = next(c for c in service.checkpoint_choices() if c.id == imported.checkpoint_id)
    from unet.exchange.checkpoint import checked_file

    kept = checked_file(service.store.abspath(choice.file))  # the import's verdict, kept: loads do not redo it
    assert kept.is_file() and choice.sha256 in kept.read_text()
    stored = load(service.store.abspath(choice.file))
    image = stack[1][:64, :64]  # one tile: the engine feeds the model exactly this slice
    ours = predict_slice(stored.build_model("cpu"), image)  # the engine: normalise, tile, sigmoid
    with torch.no_grad():
        boundary = model(torch.from_numpy(_scale_range(image.astype(np.float32))[None, None]))[0, 0].numpy()
    np.testing.assert_allclose(ours, 1 - boundary, atol=1e-4)  # a boundary map, read as neurons
    demo = service.load_demo()
    from tests.app.test_loop_pages import wait_exit

    job = service.predict(imported.checkpoint_id, demo.id, [0, 1])  # the app's prediction process runs it
    wait_exit(service.prediction(job.id).pid)
    done = service.prediction(job.id)
    assert done.status == "FINISHED", done.error
    assert service.prediction_output(job.id, "probabilities").shape == (2, 256, 256)
    with pytest.raises(UserError, match="TorchScript model imported from another tool: it predicts, but"):
        service.submit_training([{"dataset_id": demo.id, "slices": [0]}], [], preset("tiny"), preset="tiny",
                                parent_checkpoint_id=imported.checkpoint_id)
    with pytest.raises(UserError, match="a live session fine-tunes"):
        service.live_start(demo.id, imported.checkpoint_id, "user:1")
