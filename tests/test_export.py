"""Tests of `python -m export`: ONNX export and parity, config.pbtxt, installation, the command line.

TensorRT cannot be installed on the CPU machines: the engine route of the command line is exercised with
the ONNX file standing in for a plan (onnxruntime as its runner), and the real TensorRT tests at the end
are skipped unless `tensorrt` imports and a GPU is present.
"""

from __future__ import annotations

import json
import logging
import shlex

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import export.__main__ as cli
from export.common import ExportError
from export.onnx_export import OPSET, check_onnx, export_onnx, onnx_runner
from export.tensorrt_build import EngineSpec, WindowModule, autocast_like_fp16, trtexec_command
from export.triton_config import CONFIG, PLAN, VALIDATION, check_model_repository, install_plan, plan_config
from export.validate import compare, compute_reference, validation_windows
from wholebody import contract
from wholebody.bundle import load_network, make_test_bundle
from wholebody.sample_data import real_ct

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return make_test_bundle(tmp_path_factory.mktemp("bundle_f8"), init_filters=8)


@pytest.fixture(scope="module")
def ct_path():
    return real_ct("example_ct")


@pytest.fixture(scope="module")
def windows(ct_path):
    return validation_windows(2, ct_path)


@pytest.fixture
def repository(tmp_path):
    path = tmp_path / "model_repository"
    path.mkdir()
    return path


def test_validation_windows(windows):
    assert windows.data.shape == (2, contract.IN_CHANNELS, *contract.ROI_SIZE)
    assert windows.data.dtype == np.float32
    assert windows.is_ct.tolist() == [True, False]
    ct = windows.data[0]
    assert -1.0 <= ct.min() < -0.9 and ct.max() > 0.0  # air and tissue/bone in one window


@pytest.fixture(scope="module")
def small_onnx(small_bundle, tmp_path_factory, windows):
    network = load_network(small_bundle, "lowres")
    path = export_onnx(network, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return network, path


def test_onnx_matches_pytorch_small(small_onnx, windows):
    network, path = small_onnx
    check_onnx(path)
    assert not path.with_name(path.name + ".partial").exists()
    report = compare("lowres onnx", "fp32", onnx_runner(path), compute_reference(network, windows, 2), batch_size=2)
    log.info("init_filters=8: max abs %.3e, rel %.2e, labels %.4f%%", report.max_abs_error, report.max_rel_error,
             100 * report.label_agreement)
    assert report.passed, report.failures
    assert report.max_abs_error < 1e-3
    assert report.label_agreement > 0.999
    assert report.min_dice > 0.99


def test_compare_fails_a_wrong_candidate(small_onnx, windows):
    network, path = small_onnx
    reference = compute_reference(network, windows, 2)
    run = onnx_runner(path)
    report = compare("broken", "fp16", lambda w: run(w)[:, ::-1].copy(), reference, 2)  # classes reversed
    assert not report.passed
    assert any("label agreement" in f for f in report.failures)
    nan_report = compare("nan", "fp32", lambda w: np.full_like(run(w), np.nan), reference, 2)
    assert "non-finite logits" in nan_report.failures


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_check_onnx_rejects_wrong_names(small_bundle, tmp_path):
    network = load_network(small_bundle, "lowres")
    path = tmp_path / "wrong.onnx"
    torch.onnx.export(network, (torch.zeros(1, 1, *contract.ROI_SIZE),), str(path), dynamo=False,
                      opset_version=OPSET, input_names=["x"], output_names=["y"])
    with pytest.raises(ExportError, match="inputs/outputs"):
        check_onnx(path)


def test_real_architecture_export(tmp_path, ct_path):
    """The real network (init_filters=32, 18.8 M parameters): export and one CT window (~25 s on 2 cores)."""
    bundle = make_test_bundle(tmp_path / "bundle", init_filters=32)
    network = load_network(bundle, "highres")
    path = export_onnx(network, tmp_path / "model.onnx")
    assert path.stat().st_size > 70e6
    one = validation_windows(1, ct_path)
    report = compare("highres onnx", "fp32", onnx_runner(path), compute_reference(network, one, 1), batch_size=1)
    log.info("init_filters=32: max abs %.3e, rel %.2e, labels %.4f%%", report.max_abs_error, report.max_rel_error,
             100 * report.label_agreement)
    assert report.passed, report.failures


def test_config_pbtxt_matches_contract(repository):
    name = contract.network_model_name("lowres", "trt_fp16")
    config = plan_config(name, max_batch=8, opt_batch=4, parameters={"precision": "fp16", "tensorrt_version": "10.x"})
    model_dir = install_plan(repository, config, b"not really a plan", '{"passed": true}\n')
    parsed = text_format.Parse((model_dir / CONFIG).read_text(), mc.ModelConfig())
    assert parsed.name == name == "segresnet_lowres_trt_fp16"
    assert parsed.platform == "tensorrt_plan"
    assert parsed.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [
        (contract.WINDOW, mc.TYPE_FP32, [contract.IN_CHANNELS, *contract.ROI_SIZE])]
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.output] == [
        (contract.LOGITS, mc.TYPE_FP32, [contract.NUM_CLASSES, *contract.ROI_SIZE])]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4]
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    assert parsed.parameters["precision"].string_value == "fp16"
    assert (model_dir / "1" / PLAN).read_bytes() == b"not really a plan"
    assert sorted(p.name for p in model_dir.rglob("*")) == sorted(["1", CONFIG, PLAN, VALIDATION])


def test_model_repository_rule(tmp_path, repository):
    assert check_model_repository(repository) == repository
    populated = tmp_path / "models"
    (populated / "some_model").mkdir(parents=True)
    (populated / "some_model" / CONFIG).write_text('name: "some_model"\n')
    assert check_model_repository(populated) == populated
    with pytest.raises(ValueError, match="no such directory"):
        check_model_repository(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a Triton model repository"):
        check_model_repository(tmp_path / "plain")


def test_trtexec_command(tmp_path):
    spec = EngineSpec("fp16", opt_batch=4, max_batch=8, workspace_gib=8, timing_cache=tmp_path / "cache.bin")
    args = shlex.split(trtexec_command(tmp_path / "m.onnx", tmp_path / "model.plan", spec))
    assert args[0] == "trtexec"
    for expected in ("--minShapes=window:1x1x96x96x96", "--optShapes=window:4x1x96x96x96",
                     "--maxShapes=window:8x1x96x96x96", "--fp16", "--noTF32", "--memPoolSize=workspace:8192M",
                     f"--timingCacheFile={tmp_path / 'cache.bin'}", f"--saveEngine={tmp_path / 'model.plan'}"):
        assert expected in args
    fp32 = EngineSpec("fp32", 4, 8, 8, tmp_path / "cache.bin")
    assert "--fp16" not in trtexec_command(tmp_path / "m.onnx", tmp_path / "p", fp32)


def test_torch_tensorrt_modules(small_bundle, windows):
    """What the Torch-TensorRT route traces: input named `window`, dynamic batch, fp16 with fp32 GroupNorm."""
    network = load_network(small_bundle, "lowres")
    batch = torch.export.Dim("batch", min=1, max=8)
    exported = torch.export.export(WindowModule(network), (torch.zeros(2, 1, *contract.ROI_SIZE),),
                                   dynamic_shapes={contract.WINDOW: {0: batch}})
    assert [n.name for n in exported.graph.nodes if n.op == "placeholder"][-1] == contract.WINDOW

    half = autocast_like_fp16(network)
    norms = [m for m in half.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert next(network.parameters()).dtype == torch.float32  # the original is untouched
    x = torch.from_numpy(windows.data[:1])
    with torch.inference_mode():
        out = WindowModule(half, fp16=True)(x)
        ref = network(x)
    assert out.dtype == torch.float32
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.99


# --- the command line ------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr()


def test_cli_missing_bundle(tmp_path, repository, capsys):
    status, out = run_cli(capsys, "--bundle", tmp_path / "nope", "--out", repository, "--artifacts", tmp_path / "a")
    assert status == cli.EXIT_USAGE
    assert "inference.json not found" in out.err and len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not any(repository.iterdir())


@pytest.mark.parametrize("out", ["missing", "plain_dir"])
def test_cli_bad_out(small_bundle, tmp_path, capsys, out):
    target = tmp_path / out
    if out == "plain_dir":
        target.mkdir()
    status, captured = run_cli(capsys, "--bundle", small_bundle, "--out", target, "--artifacts", tmp_path / "a")
    assert status == cli.EXIT_USAGE
    assert "not a Triton model repository" in captured.err or "no such directory" in captured.err
    assert not (tmp_path / "a").exists()


def test_cli_checkpoint_with_wrong_keys(tmp_path, repository, capsys):
    bundle = make_test_bundle(tmp_path / "bundle", init_filters=8)
    torch.save({"encoder.weight": torch.zeros(3)}, bundle / "models" / "model_lowres.pt")
    status, out = run_cli(capsys, "--bundle", bundle, "--out", repository, "--artifacts", tmp_path / "a")
    assert status == cli.EXIT_USAGE
    assert "model_lowres.pt does not fit" in out.err and "missing keys" in out.err
    assert not (tmp_path / "a").exists() and not any(repository.iterdir())


@pytest.mark.parametrize("argv", [["--resolution", "midres"], ["--precision", "int8"],
                                  ["--opt-batch", "9"], ["--max-batch", "0"]])
def test_cli_bad_arguments(small_bundle, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--bundle", str(small_bundle), *argv])
    assert exc.value.code == cli.EXIT_USAGE
    assert "error" in capsys.readouterr().err


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for needle in ("examples:", "--onnx-only", "--via", "model_repository", "exit status"):
        assert needle in text


def test_cli_without_tensorrt(small_bundle, tmp_path, repository, capsys):
    if cli.tensorrt_unavailable("onnx") is None:
        pytest.skip("TensorRT is available here")
    common = ["--bundle", small_bundle, "--resolution", "lowres", "--out", repository, "--artifacts",
              tmp_path / "a", "--validation-windows", 1]
    status, out = run_cli(capsys, *common)
    assert status == cli.EXIT_NO_TENSORRT
    assert (tmp_path / "a" / "lowres" / "model.onnx").is_file()
    assert "lowres onnx" in out.out and not any(repository.iterdir())
    status, out = run_cli(capsys, *common, "--onnx-only")
    assert status == cli.EXIT_OK


@pytest.fixture
def onnx_as_engine(monkeypatch, tmp_path):
    """Stand-ins for TensorRT: the 'engine' is the ONNX file's bytes, run by onnxruntime."""
    monkeypatch.setattr(cli, "tensorrt_unavailable", lambda via: None)
    monkeypatch.setattr(cli, "build_environment",
                        lambda: {"tensorrt_version": "0.0-fake", "gpu": "Fake GPU", "compute_capability": "9.0"})
    monkeypatch.setattr(cli, "build_engine", lambda via, network, onnx_path, spec: (onnx_path.read_bytes(), "onnx"))

    def runner(engine, spec):
        path = tmp_path / f"engine_{spec.precision}.onnx"
        path.write_bytes(engine)
        return onnx_runner(path)

    monkeypatch.setattr(cli, "engine_runner", runner)
    return monkeypatch


def test_cli_installs_validated_plans(small_bundle, tmp_path, repository, capsys, onnx_as_engine):
    status, out = run_cli(capsys, "--bundle", small_bundle, "--resolution", "lowres", "--out", repository,
                          "--artifacts", tmp_path / "a", "--validation-windows", 1, "--max-batch", 4,
                          "--opt-batch", 2)
    assert status == cli.EXIT_OK, out.err
    for precision in ("fp32", "fp16"):
        name = contract.network_model_name("lowres", f"trt_{precision}")
        assert name in out.out
        model_dir = repository / name
        config = text_format.Parse((model_dir / CONFIG).read_text(), mc.ModelConfig())
        assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [2]
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["precision"] == precision and params["gpu"] == "Fake GPU"
        assert len(params["source_checkpoint_md5"]) == 32 and params["source_checkpoint"] == "model_lowres.pt"
        validation = json.loads((model_dir / "1" / VALIDATION).read_text())
        assert validation["validation"]["passed"] and validation["model"] == name
        assert (model_dir / "1" / PLAN).is_file()
    assert not list(repository.rglob("*.partial"))


def test_cli_does_not_install_failing_plans(small_bundle, tmp_path, repository, capsys, onnx_as_engine):
    onnx_as_engine.setattr(cli, "engine_runner", lambda engine, spec: lambda w: np.zeros(
        (len(w), contract.NUM_CLASSES, *contract.ROI_SIZE), np.float32))
    status, out = run_cli(capsys, "--bundle", small_bundle, "--resolution", "lowres", "--precision", "fp16",
                          "--out", repository, "--artifacts", tmp_path / "a", "--validation-windows", 1)
    assert status == cli.EXIT_FAILED
    assert "FAILED" in out.out
    assert not any(repository.iterdir())


# --- real TensorRT (GPU machines with TensorRT only) -----------------------------------------------------


@pytest.fixture(scope="module")
def tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (install the [tensorrt] extra)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    return trt


@pytest.mark.parametrize("via", ["onnx", "torch-tensorrt"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine(tensorrt, small_onnx, windows, tmp_path, via, precision):
    from export.tensorrt_build import build_engine, engine_runner

    if via == "torch-tensorrt":
        pytest.importorskip("torch_tensorrt", reason="Torch-TensorRT is not installed")
    network, onnx_path = small_onnx
    spec = EngineSpec(precision, opt_batch=2, max_batch=4, workspace_gib=4, timing_cache=tmp_path / "cache.bin")
    engine, _ = build_engine(via, network, onnx_path, spec)
    report = compare(f"trt {precision}", precision, engine_runner(engine, spec),
                     compute_reference(network, windows, 2), batch_size=2)
    assert report.passed, report.failures
    assert spec.timing_cache.is_file()
