"""Uploading and running the real compiled pipeline through kfp.Client, against fake_kfp.

fake_kfp stands in for the Kubeflow Pipelines API server (a real one needs a cluster); the
client, the HTTP traffic and the compiled package are the real ones.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kfp
import pytest
import yaml

from tests.integration.fake_kfp import FakeKFP
from visionflow.kfp.compile import compile_pipeline
from visionflow.kfp.submit import (
    SubmitError,
    params_from_overrides,
    submit,
    upload,
    version_name,
)

NAME = "visionflow-training"
SECRET = "compile-time-secret-value-7f3a"
TOKEN = "test-bearer-token-value-91c2"  # a test value, not a credential


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("kfp") / "training.yaml")


@pytest.fixture(autouse=True)
def no_machine_settings(monkeypatch, tmp_path):
    """Keep this machine's kfp context and credentials out of the tests."""
    for var in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
                "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture
def fake():
    with FakeKFP() as server:
        yield server


def run_params(*overrides: str) -> dict:
    return params_from_overrides(list(overrides))


def test_upload_sends_the_compiled_yaml_once_per_content(fake, package, tmp_path):
    pipeline_id, version_id = upload(fake.url, package, NAME)
    assert upload(fake.url, package, NAME) == (pipeline_id, version_id)
    assert list(fake.pipelines) == [pipeline_id]
    assert [v.id for v in fake.versions_of(pipeline_id)] == [version_id]
    assert fake.uploads == [package.read_bytes()]  # byte for byte what was compiled
    assert fake.versions[version_id].name == version_name(NAME, package.read_bytes())

    changed = tmp_path / "training.yaml"
    changed.write_bytes(package.read_bytes().replace(b"int8-quantized", b"int8 quantized"))
    pipeline_id2, version_id2 = upload(fake.url, changed, NAME)
    assert pipeline_id2 == pipeline_id and version_id2 != version_id
    assert len(fake.versions_of(pipeline_id)) == 2 and fake.uploads[1] == changed.read_bytes()
    assert fake.unknown == []


def test_submit_starts_the_run_in_the_named_experiment(fake, package):
    params = run_params("trainer.max_epochs=1", "model=resnet18", "run_id=nightly-7")
    result = submit(fake.url, package, NAME, "visionflow-ci", "nightly-7", params,
                    service_account="visionflow-pipeline")  # fmt: skip

    run = fake.runs[result.run_id]
    assert run.experiment_id == fake.experiment_named("visionflow-ci")["experiment_id"]
    assert run.display_name == "nightly-7"
    assert run.parameters == {"overrides": ["trainer.max_epochs=1", "model=resnet18"],
                              "run_id": "nightly-7"}  # fmt: skip
    assert (run.pipeline_id, run.version_id) == (result.pipeline_id, result.version_id)
    assert fake.versions[run.version_id].package == package.read_bytes()
    assert result.url == f"{fake.url}/#/runs/details/{result.run_id}"
    assert result.state == "PENDING" and run.service_account == "visionflow-pipeline"

    again = submit(fake.url, package, NAME, "visionflow-ci", "nightly-8", run_params())
    assert len(fake.experiments) == 1 and len(fake.versions) == 1
    assert fake.runs[again.run_id].parameters == {"overrides": [], "run_id": ""}
    assert fake.unknown == []


def test_wait_returns_when_the_run_succeeds(fake, package):
    fake.run_states = ["RUNNING", "RUNNING", "SUCCEEDED"]
    result = submit(fake.url, package, NAME, "e", "r-ok", run_params(), wait=True, poll_s=0.01)
    assert result.state == "SUCCEEDED" and fake.runs[result.run_id].polls == 3


@pytest.mark.parametrize("end", ["FAILED", "CANCELED"])
def test_wait_raises_naming_the_run_when_it_fails(fake, package, end):
    fake.run_states = ["RUNNING", end]
    with pytest.raises(SubmitError) as err:
        submit(fake.url, package, NAME, "e", "r-bad", run_params(), wait=True, poll_s=0.01)
    (run_id,) = fake.runs
    assert f"run 'r-bad' ({run_id}) ended {end}" in str(err.value)
    assert f"{fake.url}/#/runs/details/{run_id}" in str(err.value)


def test_wait_gives_up_after_the_timeout(fake, package):
    fake.run_states = ["RUNNING"]
    with pytest.raises(SubmitError, match=r"still RUNNING after 0.2 s; it goes on"):
        submit(fake.url, package, NAME, "e", "r", run_params(), wait=True, timeout_s=0.2,
               poll_s=0.05)  # fmt: skip


@pytest.mark.timeout(120)  # retrying for ever would hang here: a failure, not a slow pass
def test_an_unreachable_host_fails_naming_it(package):
    with pytest.raises(SubmitError, match=r"cannot reach Kubeflow Pipelines at http://127.0.0.1:9"):
        submit("http://127.0.0.1:9", package, NAME, "e", "r", run_params())


class NotKFP(BaseHTTPRequestHandler):
    """Another web server: a login redirect, a 404, or an HTML page."""

    answer: tuple[int, dict[str, str], bytes]

    def do_GET(self) -> None:  # noqa: N802
        status, headers, body = self.answer
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    "answer, message",
    [
        ((302, {"Location": "http://127.0.0.1/dex/auth?state=abc"}, b""),
         r"redirected the API call to a login page \(http://127.0.0.1/dex/auth\).*KF_PIPELINES_TOKEN"),
        ((404, {}, b"not found"), r"no Kubeflow Pipelines API at http://127.0.0.1:\d+"),
        ((200, {"Content-Type": "text/html"}, b"<html></html>"), "not as a Kubeflow Pipelines API"),
        ((503, {}, b'{"message": "database is down"}'), "not healthy: HTTP 503 database is down"),
    ],
)  # fmt: skip
def test_a_server_that_is_not_a_usable_kfp_api_is_named(package, answer, message):
    handler = type("Handler", (NotKFP,), {"answer": answer})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(SubmitError, match=message):
            upload(f"http://127.0.0.1:{server.server_address[1]}", package, NAME)
    finally:
        server.shutdown()
        server.server_close()


def test_a_host_without_a_scheme_is_refused(package):
    with pytest.raises(SubmitError, match="http:// or https://"):
        upload("127.0.0.1:9", package, NAME)


def test_credentials_come_from_the_environment_and_are_never_shown(package, monkeypatch,
                                                                    caplog, capsys):  # fmt: skip
    caplog.set_level(logging.DEBUG)
    with FakeKFP(token=TOKEN) as fake:
        with pytest.raises(SubmitError, match=r"HTTP 401.*KF_PIPELINES_TOKEN"):
            upload(fake.url, package, NAME)
        monkeypatch.setenv("KF_PIPELINES_TOKEN", "wrong-" + TOKEN)
        with pytest.raises(SubmitError, match="token in KF_PIPELINES_TOKEN was refused") as err:
            upload(fake.url, package, NAME)
        assert TOKEN not in str(err.value)
        monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
        result = submit(fake.url, package, NAME, "e", "r", run_params(), wait=True, poll_s=0.01)
        assert result.state == "SUCCEEDED"
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err


def test_multi_user_needs_a_namespace_the_caller_may_use(package):
    with FakeKFP(multi_user=True, namespaces=("team-a",)) as fake:
        result = submit(fake.url, package, NAME, "e", "r", run_params(), namespace="team-a")
        assert fake.experiment_named("e")["namespace"] == "team-a"
        assert fake.pipelines[result.pipeline_id]["namespace"] == "team-a"
        with pytest.raises(SubmitError, match=r"namespace 'nobody'.*HTTP 403.*does not exist"):
            submit(fake.url, package, NAME, "e", "r", run_params(), namespace="nobody")
        with pytest.raises(SubmitError, match="multi-user: pass a namespace"):
            submit(fake.url, package, NAME, "e", "r", run_params())


def test_bad_parameters_and_packages_fail_before_any_request(fake, package, tmp_path):
    with pytest.raises(SubmitError, match=r"unknown pipeline parameter\(s\) epochs; .*max_epochs"):
        submit(fake.url, package, NAME, "e", "r", {"epochs": 3})
    with pytest.raises(SubmitError, match="overrides is LIST, got str"):
        submit(fake.url, package, NAME, "e", "r", {"overrides": "model=resnet18"})
    with pytest.raises(SubmitError, match="visionflow pipeline compile"):
        upload(fake.url, tmp_path / "missing.yaml", NAME)
    (tmp_path / "notes.yaml").write_text("hello: world\n")
    with pytest.raises(SubmitError, match="not a compiled KFP pipeline"):
        upload(fake.url, tmp_path / "notes.yaml", NAME)
    assert fake.requests == []


def test_the_uploaded_package_carries_no_credential(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "compile-time-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    package = compile_pipeline(tmp_path / "training.yaml")
    upload(fake.url, package, NAME)
    (sent,) = fake.uploads
    assert SECRET.encode() not in sent and b"compile-time-access-key" not in sent
    # every document (pipeline spec, and platform spec once Kubernetes settings are added)
    docs = list(yaml.safe_load_all(sent))
    assert docs[0]["pipelineInfo"]["name"] == NAME


@pytest.mark.parametrize(
    "override",
    [
        "storage=minio",
        "tracking.uri=http://elsewhere:5000",
        "run_id=../x",
        "optim.optimizer._target_=os.system",
    ],  # fmt: skip
)
def test_submit_refuses_what_the_cluster_would_refuse_before_uploading(fake, override, capsys):
    """Where artifacts and runs go is the release's (its mounted config); a run may not say."""
    from visionflow.cli import main

    code = main(["pipeline", "submit", "--host", fake.url, override])
    assert code == 2
    assert "refused" in capsys.readouterr().err
    assert fake.uploads == [] and fake.runs == {}
