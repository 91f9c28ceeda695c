"""The MLflow registry stage with a real sqlite store, real ONNX exports and real ONNX Runtime sessions.

Exports come from :func:`pipelines.export.export_model` on tiny models (two training steps each); their
evaluation metrics are passed in, so that the policy has known numbers to rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from latentforge.models import MODELS, train_step
from latentforge.pipelines.cli import main
from latentforge.pipelines.common.params import ParamsError
from latentforge.pipelines.common.tracking import fluent_tracking
from latentforge.pipelines.export import export_model, load_sessions
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from latentforge.pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    Gate,
    Policy,
    RegistryError,
    check_gates,
    list_models,
    promote,
    register,
    version_model_id,
)
from tests.pipelines.conftest import REPO, tiny_section

PSNR = Policy("psnr", "max", 0.5)  # higher is better, by more than 0.5 dB


def _tiny_model(family: str, prepared: Path, out: Path) -> Path:
    """A tiny model of ``family`` after two training steps on the prepared data, saved with save_pretrained."""
    h, w, c = json.loads((prepared / "manifest.json").read_text())["image_shape"]
    cls = MODELS[family]
    torch.manual_seed(0)
    model = cls(cls.config_class.from_dict({**tiny_section(family), "image_size": h, "channels": c}))
    optimizers = model.configure_optimizers()
    images = batch_to_tensor(load_split(prepared, "train")["images"][:16])
    batch = {"image": images, "label": torch.zeros(16, dtype=torch.int64), "index": torch.arange(16)}
    for step in range(2):
        train_step(model, optimizers, batch, step)
    return model.save_pretrained(out / family / "model")


@pytest.fixture(scope="module")
def store(project):
    """A sqlite tracking store (and its artifacts beside it), with one finished "training" run."""
    from latentforge.pipelines.common.tracking import experiment_id as _experiment_id, mlflow_client

    root, _ = project
    uri = f"sqlite:///{root / 'registry' / 'mlflow.db'}"
    (root / "registry").mkdir()
    client = mlflow_client(uri)
    run = client.create_run(_experiment_id(client, "latentforge", uri), run_name="train-vae")
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


@pytest.fixture(scope="module")
def exports(project, store):
    """The prepared data (``prepared``) and export directories: ``vae`` (iwae_nll 10, recon_mse 0.05, exported from the training run), ``ae-good``
    / ``ae-worse`` / ``ae-better`` (psnr 20 / 18 / 21, no run) and ``gan`` (no evaluation metrics)."""
    root, params = project
    _, run_id = store
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    out = root / "exports"
    models = {family: _tiny_model(family, prepared, root / "models") for family in ("vae", "ae", "gan")}
    dirs = {label: out / label for label in ("vae", "ae-good", "ae-worse", "ae-better", "gan")}
    export_model(models["vae"], prepared, dirs["vae"], metrics={"iwae_nll": 10.0, "recon_mse": 0.05},
                 source={"mlflow_run_id": run_id, "git_commit": "c0ffee"})
    for label, psnr in (("ae-good", 20.0), ("ae-worse", 18.0), ("ae-better", 21.0)):
        export_model(models["ae"], prepared, dirs[label], metrics={"psnr": psnr})
    export_model(models["gan"], prepared, dirs["gan"])
    return {**dirs, "prepared": prepared}


def _aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return {alias: str(v) for alias, v in MlflowClient(uri).get_registered_model(name).aliases.items()}


def test_register_and_promote_by_policy(store, exports):
    uri, train_run = store
    name = "ae-policy"
    first = register(exports["ae-good"], uri, data_dir=exports["prepared"], name=name, policy=PSNR)
    assert int(first.version) == 1 and first.tags["family"] == "ae"
    assert first.tags["primary_metric"] == "psnr" and float(first.tags["primary_metric_value"]) == 20.0
    assert first.tags["mlflow_run_id"] == first.run_id != train_run  # no run in the export: a new one
    assert first.tags["git_commit"] == "unknown" and len(first.tags["data_hash"]) == 64
    assert _aliases(uri, name) == {}  # registering sets no alias

    # The first version becomes champion: there is none to beat.
    decision = promote(name, uri, policy=PSNR)
    assert decision["alias"] == CHAMPION and decision["changed"] and decision["previous_champion"] is None
    assert _aliases(uri, name) == {CHAMPION: "1"}

    # A worse version stays challenger; the champion does not move.
    assert int(register(exports["ae-worse"], uri, data_dir=exports["prepared"], name=name, policy=PSNR).version) == 2
    decision = promote(name, uri, policy=PSNR)
    assert decision["alias"] == CHALLENGER and (decision["value"], decision["champion_value"]) == (18.0, 20.0)
    assert _aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "2"}

    # Better by 1 dB: not enough against a margin of 2, enough against the margin of 0.5.
    register(exports["ae-better"], uri, data_dir=exports["prepared"], name=name, policy=PSNR)
    assert promote(name, uri, policy=Policy("psnr", "max", 2.0))["alias"] == CHALLENGER
    assert _aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "3"}
    decision = promote(name, uri, policy=PSNR)
    assert decision["alias"] == CHAMPION and decision["previous_champion"] == 1 and decision["metric"] == "psnr"
    # The new champion is no longer challenger; the displaced champion keeps no alias.
    assert _aliases(uri, name) == {CHAMPION: "3"}
    assert promote(name, uri, policy=PSNR)["changed"] is False  # idempotent

    # By hand: any version becomes champion (a rollback), whatever the policy says.
    decision = promote(name, uri, version=2)
    assert decision["changed"] and decision["previous_champion"] == 3
    assert _aliases(uri, name) == {CHAMPION: "2"}

    rows = list_models(uri, name=name)
    assert [(r["version"], r["aliases"]) for r in rows] == [(3, []), (2, [CHAMPION]), (1, [])]
    assert rows[0]["primary_metric"] == "psnr" and rows[0]["primary_metric_value"] == 21.0
    assert rows[2]["run_id"] == first.run_id and rows[0]["created"]


def test_a_held_champion_never_moves(store, exports):
    """``hold_champion`` (what ``register --promote`` passes inside a DVC experiment): a version the policy
    or the hand would make champion becomes challenger, with no champion yet too; the reason says why."""
    uri, _ = store
    name = "ae-held"
    hold = "this runs in DVC experiment 'psnr-up' (baseline 0123456)"
    first = register(exports["ae-good"], uri, data_dir=exports["prepared"], name=name, policy=PSNR, tags={"dvc_experiment": "psnr-up"})
    assert first.tags["dvc_experiment"] == "psnr-up" and first.tags["family"] == "ae"
    decision = promote(name, uri, policy=PSNR, hold_champion=hold)  # no champion yet: still not champion
    assert decision["alias"] == CHALLENGER and decision["held"] and decision["previous_champion"] is None
    assert decision["reason"] == ("challenger, not champion: would be champion by policy: no champion before, but champion "
                                  f"is kept (none) because {hold}")
    assert _aliases(uri, name) == {CHALLENGER: "1"}
    assert promote(name, uri, policy=PSNR)["alias"] == CHAMPION  # the main pipeline run promotes it
    assert _aliases(uri, name) == {CHAMPION: "1"}

    register(exports["ae-better"], uri, data_dir=exports["prepared"], name=name, policy=PSNR)  # beats the champion by 1 dB > margin 0.5
    decision = promote(name, uri, policy=PSNR, hold_champion=hold)
    assert decision["alias"] == CHALLENGER and decision["held"] and decision["changed"]
    assert "would be champion by policy: psnr 21 > 20 + margin 0.5" in decision["reason"]
    assert "champion is kept (version 1) because this runs in DVC experiment 'psnr-up'" in decision["reason"]
    assert _aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "2"}

    register(exports["ae-worse"], uri, data_dir=exports["prepared"], name=name, policy=PSNR)  # the policy keeps it challenger anyway: nothing held
    decision = promote(name, uri, policy=PSNR, hold_champion=hold)
    assert decision["alias"] == CHALLENGER and "held" not in decision and decision["reason"].startswith("challenger by policy")
    decision = promote(name, uri, version=2, hold_champion=hold)  # by hand (register-text --champion) is held too
    assert decision["alias"] == CHALLENGER and decision["held"] and "would be champion by hand (was version 1)" in decision["reason"]
    assert _aliases(uri, name) == {CHAMPION: "1", CHALLENGER: "2"}
    assert promote(name, uri, version=2)["alias"] == CHAMPION  # `latentforge promote --version 2`
    assert _aliases(uri, name) == {CHAMPION: "2"}


def test_training_run_fallback_and_missing_metric(store, exports):
    uri, train_run = store
    # Logged to the training run the export names; the VAE's default policy ranks by iwae_nll.
    name = "vae-fallback"
    first = register(exports["vae"], uri, data_dir=exports["prepared"], name=name)
    assert first.run_id == first.tags["mlflow_run_id"] == train_run and first.tags["git_commit"] == "c0ffee"
    assert first.tags["primary_metric"] == "iwae_nll" and first.tags["metric.recon_mse"] == "0.05"
    register(exports["vae"], uri, data_dir=exports["prepared"], name=name)
    promote(name, uri, version=1)
    # Neither version has `elbo`: the fallback ranks them; equal values: a tie never wins.
    decision = promote(name, uri, policy=Policy("elbo", "max", 0.0, fallback=Policy("recon_mse", "min", 0.0)))
    assert decision["metric"] == "recon_mse" and decision["alias"] == CHALLENGER
    with pytest.raises(RegistryError, match="holds vae versions; this export is a gan"):
        register(exports["gan"], uri, data_dir=exports["prepared"], name=name)

    # No metric at all (an export without evaluation figures): ranked by nothing, so promote refuses.
    name = "gan-nometric"
    version = register(exports["gan"], uri, data_dir=exports["prepared"], name=name)
    assert version.tags["primary_metric"] == "fd_classifier" and "primary_metric_value" not in version.tags
    assert promote(name, uri)["alias"] == CHAMPION  # no champion: no metric needed
    register(exports["gan"], uri, data_dir=exports["prepared"], name=name)
    with pytest.raises(RegistryError, match=r"cannot rank gan-nometric version 2 against champion version 1.*compares fd_classifier.*--version 2"):
        promote(name, uri)
    assert _aliases(uri, name) == {CHAMPION: "1"}


def test_unknown_model_or_version_moves_nothing(store, exports):
    uri, _ = store
    name = "ae-errors"
    register(exports["ae-good"], uri, data_dir=exports["prepared"], name=name)
    promote(name, uri)
    with pytest.raises(RegistryError, match=r"no registered model 'vae-nope'.*ae-errors"):
        promote("vae-nope", uri)
    with pytest.raises(RegistryError, match=r"'ae-errors' has no version 7; versions: 1"):
        promote(name, uri, version=7)
    with pytest.raises(RegistryError, match="vae-nope"):
        list_models(uri, name="vae-nope")
    assert _aliases(uri, name) == {CHAMPION: "1"}

    # An export naming a training run this store does not have.
    moved = exports["vae"].parent / "vae-elsewhere"
    shutil.copytree(exports["vae"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["mlflow_run_id"] = "0" * 32
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="training run 0{32} is not in the tracking store"):
        register(moved, uri, data_dir=exports["prepared"], name="vae-elsewhere")
    assert [r["version"] for r in list_models(uri, name=name)] == [1]


def test_champion_loads_in_a_fresh_process(store, exports, tmp_path):
    """``mlflow.pyfunc.load_model("models:/<name>@champion")`` in a new interpreter, run from outside the
    repo: its predictions equal the export's ONNX sessions called directly."""
    uri, _ = store
    for name, export in (("vae-served", exports["vae"]), ("gan-served", exports["gan"])):
        register(export, uri, data_dir=exports["prepared"], name=name)
        promote(name, uri, version=1)
    images = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32)
    noise = np.random.default_rng(2).standard_normal((3, *json.loads((exports["gan"] / "manifest.json").read_text())["sampling"]["noise_shape"])).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", images=images, noise=noise)
    script = textwrap.dedent(f"""
        import mlflow, numpy as np
        inputs = np.load({str(tmp_path / 'inputs.npz')!r})
        vae = mlflow.pyfunc.load_model("models:/vae-served@champion")
        gan = mlflow.pyfunc.load_model("models:/gan-served@champion")
        out = {{f"vae_{{k}}": v for k, v in vae.predict(inputs["images"]).items()}}
        out.update({{f"gan_{{k}}": v for k, v in gan.predict(inputs["noise"]).items()}})
        np.savez({str(tmp_path / 'outputs.npz')!r}, **out)
        try:
            vae.predict(inputs["images"] * 2)
        except Exception as exc:
            print("rejected:", exc)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rejected: image values must lie in [0, 1]" in proc.stdout
    out = np.load(tmp_path / "outputs.npz")

    _, vae = load_sessions(exports["vae"])
    mean, logvar = vae["encoder"].run(["mean", "logvar"], {"images": images})
    recon = vae["decoder"].run(["images"], {"latent": mean})[0]
    np.testing.assert_allclose(out["vae_mean"], mean, atol=1e-6)
    np.testing.assert_allclose(out["vae_logvar"], logvar, atol=1e-6)
    np.testing.assert_allclose(out["vae_reconstruction"], recon, atol=1e-6)
    assert recon.shape == (3, 3, 16, 16)
    _, gan = load_sessions(exports["gan"])
    np.testing.assert_allclose(out["gan_images"], gan["generator"].run(["images"], {"noise": noise})[0], atol=1e-6)


def _params_file(path: Path, params: dict, gates: dict | None) -> str:
    """``params`` with the vae policy's gates replaced by ``gates`` (None: none), written to ``path``."""
    params = json.loads(json.dumps(params))
    params["registry"]["policies"]["vae"]["gates"] = gates
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def test_cli(project, store, exports, monkeypatch, capsys):
    root, base = project
    uri, _ = store
    params = _params_file(root / "params-nogates.yaml", base, None)  # these exports record no sample figures
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)  # the default export dir, artifacts/export/<family>, is relative

    def run(*argv):
        code = main(list(argv) + ["--params", params])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("register", "--model", "vae", "--export-dir", str(exports["vae"]), "--name", "cli-vae", "--promote")
    assert code == 0 and "registered cli-vae version 1" in out and "champion by policy" in out
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # MLflow's fluent API was pointed at it and put back
    code, out, err = run("register", "--model", "vae", "--export-dir", str(exports["vae"]), "--name", "cli-vae", "--promote")
    assert code == 0 and "cli-vae version 2: challenger by policy: not iwae_nll 10 < 10" in out, err
    code, out, _ = run("promote", "--model", "vae", "--name", "cli-vae", "--version", "2")
    assert code == 0 and "cli-vae version 2: champion by hand" in out
    code, out, _ = run("models", "--name", "cli-vae")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("NAME") and len(lines) == 3
    assert lines[1].split()[:3] == ["cli-vae", "2", "champion"] and "iwae_nll=10" in lines[1]

    # User errors: one line on stderr, exit status 2, no alias moved.
    for argv, message in (
        (("promote", "--model", "vae", "--name", "cli-nope"), "no registered model 'cli-nope'"),
        (("promote", "--model", "vae", "--name", "cli-vae", "--version", "9"), "has no version 9"),
        (("register", "--model", "vae"), "no export at"),
        (("register", "--model", "gan", "--export-dir", str(exports["vae"])), "holds a vae export, not gan"),
    ):
        code, _, err = run(*argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _aliases(uri, "cli-vae") == {CHAMPION: "2"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for argv in (("models",), ("promote", "--model", "vae")):
        code, _, err = run(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"latentforge {argv[0]}: error: MLflow tracking store http://127.0.0.1:9 is unreachable")


def test_params_policy():
    from latentforge.pipelines.evaluate import primary_metric
    from latentforge.pipelines.common.params import ParamsError, apply_overrides, load_params
    from latentforge.pipelines.registry import policy_for

    params = load_params(REPO / "params.yaml")
    assert policy_for(params, "vae").metric_names == ["iwae_nll", "recon_mse"]
    assert policy_for(params, "ae") == Policy("recon_mse", "min", 0.0)  # the default entry
    for family, cls in MODELS.items():
        # params.yaml and the built-in defaults rank alike (params add gates), first by what `evaluate` calls primary.
        policy = policy_for(params, family)
        assert dataclasses.replace(policy, gates=()) == policy_for(None, family), family
        assert (policy.metric, policy.mode) == primary_metric(family, cls.has_encoder), family
    for family in params["train"]["families"]:  # every family the demo serves must generate to be champion
        # each demo family is gated on the validity and precision of the samples it serves (the VAE: its gmm sampler's)
        served = {g.metric.removeprefix("gmm_") for g in policy_for(params, family).gates}
        assert served >= {"sample_validity", "sample_precision_ratio"}, family
    assert policy_for(apply_overrides(params, ["registry.policies.vae.margin=0.25"]), "vae").margin == 0.25
    with pytest.raises(ParamsError, match="mode must be min or max"):
        policy_for(apply_overrides(params, ["registry.policies.vae.mode=lowest"]), "vae")
    with pytest.raises(ParamsError, match=r"registry.policies.gan: unknown key\(s\) metrc"):
        policy_for({"registry": {"policies": {"gan": {"metrc": "fid", "mode": "min", "margin": 0}}}}, "gan")


# ----------------------------------------------------------------------------------------------------
# Gates


def test_gates_from_params():
    policy = Policy.from_dict({"metric": "fd_classifier", "mode": "min", "margin": 0,
                               "gates": {"sample_validity": ">= 0.5", "fd_classifier_ratio": "<3"}}, "registry.policies.gan")
    assert policy.gates == (Gate("sample_validity", ">=", 0.5), Gate("fd_classifier_ratio", "<", 3.0))
    assert Policy.from_dict(policy.to_dict(), "again") == policy  # to_dict is the params form
    assert policy.failed_gates({"sample_validity": 0.5, "fd_classifier_ratio": 2.9}) == []
    assert policy.failed_gates({"sample_validity": 0.49, "fd_classifier_ratio": 3.0}) == [
        "sample_validity 0.49, needs >= 0.5", "fd_classifier_ratio 3, needs < 3"]
    assert policy.failed_gates({"fd_classifier_ratio": 1.0}) == ["sample_validity not recorded, needs >= 0.5"]
    for bad in ("0.5", "=> 0.5", ">= half", ">= nan", None):
        with pytest.raises(ParamsError, match=r'registry.policies.gan.gates.sample_validity: expected "<op> <number>"'):
            Policy.from_dict({"metric": "m", "mode": "min", "margin": 0, "gates": {"sample_validity": bad}},
                             "registry.policies.gan")
    with pytest.raises(ParamsError, match=r"registry.policies.vae.fallback: unknown key\(s\) gates"):
        Policy.from_dict({"metric": "m", "mode": "min", "margin": 0,
                          "fallback": {"metric": "n", "mode": "min", "margin": 0, "gates": {"n": "> 1"}}}, "registry.policies.vae")


def test_gates_keep_a_failing_version_from_champion(store, exports):
    uri, _ = store
    name = "ae-gated"
    gated = Policy("psnr", "max", 0.0, gates=(Gate("psnr", ">=", 19.0),))
    # A first version that fails its gate becomes challenger, not champion: nothing is served.
    register(exports["ae-worse"], uri, data_dir=exports["prepared"], name=name)  # psnr 18
    decision = promote(name, uri, policy=gated)
    assert decision["alias"] == CHALLENGER and decision["failed_gates"] == ["psnr 18, needs >= 19"]
    assert decision["reason"] == "challenger by policy: fails its gates: psnr 18, needs >= 19 (no champion)"
    assert _aliases(uri, name) == {CHALLENGER: "1"}
    # A gate that holds: the next version (psnr 20) becomes champion.
    register(exports["ae-good"], uri, data_dir=exports["prepared"], name=name)
    decision = promote(name, uri, policy=gated)
    assert decision["alias"] == CHAMPION and decision["failed_gates"] == []
    assert _aliases(uri, name) == {CHAMPION: "2", CHALLENGER: "1"}
    # Better by policy (21 > 20) but failing a stricter gate: the champion stays, and the reason says why.
    register(exports["ae-better"], uri, data_dir=exports["prepared"], name=name)
    strict = Policy("psnr", "max", 0.0, gates=(Gate("psnr", ">=", 25.0),))
    decision = promote(name, uri, policy=strict)
    assert decision["alias"] == CHALLENGER and "psnr 21, needs >= 25 (champion stays version 2)" in decision["reason"]
    assert _aliases(uri, name) == {CHAMPION: "2", CHALLENGER: "3"}
    # A gate on a figure the version does not record fails, named.
    missing = Policy("psnr", "max", 0.0, gates=(Gate("sample_validity", ">=", 0.5),))
    decision = promote(name, uri, policy=missing)
    assert decision["alias"] == CHALLENGER and decision["failed_gates"] == ["sample_validity not recorded, needs >= 0.5"]
    assert _aliases(uri, name) == {CHAMPION: "2", CHALLENGER: "3"}
    # By hand the version still becomes champion; the reason says which gate it fails.
    decision = promote(name, uri, version=3, policy=strict)
    assert decision["changed"] and decision["reason"] == "champion by hand (was version 2); it fails its gates: psnr 21, needs >= 25"
    assert _aliases(uri, name) == {CHAMPION: "3"}
    report = check_gates(name, uri, strict)
    assert report["champion"] == 3 and report["versions"] == [
        {"version": 3, "roles": ["newest", "champion"], "figures": {"psnr": 21.0}, "failed": ["psnr 21, needs >= 25"]}]


def test_cli_gates(project, store, exports, monkeypatch, capsys):
    root, base = project
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def run(params, *argv):
        code = main(list(argv) + ["--params", params])
        out, err = capsys.readouterr()
        return code, out, err

    # The vae export records iwae_nll 10 and recon_mse 0.05; the registered model is vae-<data.name>.
    holds = _params_file(root / "params-holds.yaml", base, {"recon_mse": "<= 0.1"})
    fails = _params_file(root / "params-fails.yaml", base, {"recon_mse": "<= 0.01", "sample_validity": ">= 0.5"})
    code, out, err = run(fails, "register", "--model", "vae", "--export-dir", str(exports["vae"]), "--promote")
    assert code == 0, err
    assert ("version 1: challenger by policy: fails its gates: recon_mse 0.05, needs <= 0.01; "
            "sample_validity not recorded, needs >= 0.5 (no champion)") in out
    code, _, err = run(fails, "gates", "--model", "vae")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "vae: vae-shapes version 1 (newest) fails recon_mse 0.05, needs <= 0.01" in err and "vae-shapes has no champion" in err

    code, out, err = run(holds, "register", "--model", "vae", "--export-dir", str(exports["vae"]), "--promote")
    assert code == 0 and "version 2: champion by policy: no champion before" in out, err
    code, out, err = run(holds, "gates", "--model", "vae")
    assert code == 0 and "vae-shapes version 2 (newest, champion): passes its gates: recon_mse 0.05 <= 0.1" in out, err

    # By hand, against a gate the version fails: it is done, and said.
    code, out, _ = run(fails, "promote", "--model", "vae", "--version", "1")
    assert code == 0 and "vae-shapes version 1: champion by hand (was version 2); it fails its gates: recon_mse 0.05" in out
    code, _, err = run(fails, "gates", "--model", "vae")
    assert code == 2 and "vae-shapes version 1 (champion) fails" in err and "version 2 (newest) fails" in err
    code, _, err = run(holds, "gates", "--model", "gan")  # never registered under gan-shapes here
    assert code == 2 and "gan: no registered model 'gan-shapes'" in err


def test_versions_are_logged_models_from_code_with_linked_metrics_and_real_examples(store, exports, tmp_path):
    """A version is the LoggedModel of ``mlflow.pyfunc.log_model`` (a model from code, not a pickle), the
    export's evaluation metrics linked to it; its input example is the prepared test split's first images
    (noise only for a generate-only export); registering without the data is one clear error."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    uri, _ = store
    client = MlflowClient(uri)
    version = register(exports["vae"], uri, name="vae-logged", data_dir=exports["prepared"])
    assert version.source == f"models:/{version_model_id(version)}"
    logged = client.get_logged_model(version_model_id(version))
    assert logged.source_run_id == version.run_id
    assert {m.key: m.value for m in logged.metrics} == {"iwae_nll": 10.0, "recon_mse": 0.05}

    with fluent_tracking(uri):  # models:/ URIs resolve against the fluent registry
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(tmp_path / "vae")))
    model = Model.load(local)
    flavor = model.flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert flavor["config"] == {"format_version": json.loads((exports["vae"] / "manifest.json").read_text())["format_version"]}
    expected = load_split(exports["prepared"], "test")["images"][:2].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_allclose(model.load_input_example(local), expected, atol=1e-7)

    gan = register(exports["gan"], uri, name="gan-logged")  # noise in, images out: no data needed
    with fluent_tracking(uri):
        gan_local = Path(mlflow.artifacts.download_artifacts(f"models:/{gan.name}/{gan.version}", dst_path=str(tmp_path / "gan")))
    noise_shape = json.loads((exports["gan"] / "manifest.json").read_text())["sampling"]["noise_shape"]
    assert Model.load(gan_local).load_input_example(gan_local).shape == (2, *noise_shape)
    assert client.get_logged_model(version_model_id(gan)).metrics in (None, [])  # no evaluation metrics in that export

    with pytest.raises(RegistryError, match="needs its prepared data"):
        register(exports["vae"], uri, name="vae-logged")
    other = tmp_path / "other-data"
    shutil.copytree(exports["prepared"], other)
    data_manifest = json.loads((other / "manifest.json").read_text())
    data_manifest["data_hash"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(data_manifest))
    with pytest.raises(RegistryError, match=r"holds data ffffffffffff, but the export was made from"):
        register(exports["vae"], uri, name="vae-logged", data_dir=other)
    assert [r["version"] for r in list_models(uri, name="vae-logged")] == [1]


def test_promote_ranks_by_the_logged_model_metrics(store, exports):
    """The policy compares the metrics linked to the versions' LoggedModels, not the ``metric.*`` tag copies;
    a version registered before LoggedModels (no ``model_id``) is ranked by its tags."""
    from mlflow.tracking import MlflowClient

    uri, _ = store
    client = MlflowClient(uri)
    name = "ae-logged"
    first = register(exports["ae-good"], uri, name=name, policy=PSNR, data_dir=exports["prepared"])  # psnr 20
    promote(name, uri, policy=PSNR)
    second = register(exports["ae-worse"], uri, name=name, policy=PSNR, data_dir=exports["prepared"])  # psnr 18
    # A later figure for version 2's model (say, evaluated again): 22 on the LoggedModel, 18 in its tags.
    client.log_metric(second.run_id, "psnr", 22.0, model_id=version_model_id(second))
    assert client.get_model_version(name, "2").tags["metric.psnr"] == "18.0"
    decision = promote(name, uri, policy=PSNR)
    assert decision["alias"] == CHAMPION and (decision["value"], decision["champion_value"]) == (22.0, 20.0)

    # An older version: registered without a LoggedModel, its metrics only in the tags.
    old = client.create_model_version(name, source=f"runs:/{first.run_id}/{name}", run_id=first.run_id,
                                      tags={"family": "ae", "metric.psnr": "23.0"})
    assert version_model_id(old) is None
    decision = promote(name, uri, policy=PSNR)
    assert decision["version"] == int(old.version) and decision["alias"] == CHAMPION
    assert (decision["value"], decision["champion_value"]) == (23.0, 22.0)
