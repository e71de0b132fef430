"""Credentials never leave the process that holds them, and every Ray cluster fluxbatch starts requires
Ray's authentication token. (Pickle weights are refused: tests/test_cli.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import write_manifest
from tests.own_ray import OwnRay

ENV_SECRET = "env-secret-5f1d9a0c7e"
OPTION_SECRET = "option-secret-b83e21d4aa"


def test_session_cluster_started_by_ray_init_requires_the_token(ray_cluster):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN


PROBE = textwrap.dedent("""
    import grpc, ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from ray.core.generated import gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc
    from pipeline.run import _ensure_ray
    from schemas import JobSpec

    _ensure_ray(JobSpec(manifest="m.parquet", output={"uri": "out"}))
    print("mode", get_authentication_mode() == AuthenticationMode.TOKEN)
    stub = rpc.NodeInfoGcsServiceStub(grpc.insecure_channel(ray.get_runtime_context().gcs_address))
    try:
        stub.GetClusterId(pb.GetClusterIdRequest(), timeout=20)
        print("anonymous", "accepted")
    except grpc.RpcError as error:
        print("anonymous", error.code().name)
    ray.shutdown()
""")


@pytest.mark.slow
def test_ray_cluster_started_by_fluxbatch_refuses_calls_without_the_token_even_if_told_otherwise():
    ray = OwnRay()
    try:
        result = subprocess.run([sys.executable, "-c", PROBE], env=ray.env(RAY_AUTH_MODE="disabled"),
                                cwd=ray.env()["PYTHONPATH"], capture_output=True, text=True, timeout=300,
                                start_new_session=True)
    finally:
        ray.cleanup()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mode True" in result.stdout
    assert "anonymous UNAUTHENTICATED" in result.stdout, result.stdout
    assert "RAY_AUTH_MODE=disabled ignored" in result.stderr


@pytest.mark.slow
def test_credentials_never_appear_in_logs_job_file_metadata_summary_or_ray_logs(tmp_path, tiny_model, s3_server,
                                                                                  bucket):
    """Storage credentials, and a C2PA signing key kept in the bucket (read by the driver, signing on the
    renderers)."""
    import boto3

    from tests.signing_certs import make_signer

    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing-key-id",
                          aws_secret_access_key="testing-secret-never-logged", region_name="us-east-1")
    signer = make_signer(tmp_path / "keys")
    client.upload_file(str(signer.certificate), bucket, "keys/signer.pem")
    client.upload_file(str(signer.key), bucket, "keys/signer.key")
    client.upload_file(str(write_manifest(tmp_path / "m.parquet", [
        {"id": "a", "prompt": "a cat", "width": 64, "height": 64},
        {"id": "b", "prompt": "bad", "width": 70, "height": 64},
    ])), bucket, "in/m.parquet")
    out = f"s3://{bucket}/secret-run"
    ray = OwnRay()
    try:
        result = ray.run(["-v", "render", f"s3://{bucket}/in/m.parquet", out, "--model", str(tiny_model),
                          "--no-progress", "--storage-option", f"secret={OPTION_SECRET}",
                          "--storage-option", "key=testing-key-id",
                          "--c2pa-certificate", f"s3://{bucket}/keys/signer.pem",
                          "--c2pa-key", f"s3://{bucket}/keys/signer.key"],
                         # Credentials travel the same path to any renderer; the stand-in's is seconds faster.
                         module="tests.stand_in_cli", AWS_ENDPOINT_URL=s3_server, AWS_ACCESS_KEY_ID="testing-key-id",
                         AWS_SECRET_ACCESS_KEY=ENV_SECRET, AWS_DEFAULT_REGION="us-east-1")
        ray.stop()
        ray_logs = {str(p): p.read_bytes() for p in Path(ray.temp_dir).rglob("*")
                    if p.is_file() and not p.is_symlink() and p.stat().st_size < 50 * 2**20}
    finally:
        ray.cleanup()

    assert "1 rendered" in result.stdout, result.stderr[-3000:]
    written = {obj["Key"]: client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
               for obj in client.list_objects_v2(Bucket=bucket, Prefix="secret-run/")["Contents"]}
    assert {"secret-run/_job.json", "secret-run/summary.json", "secret-run/_SUCCESS"} <= set(written)
    assert any(k.startswith("secret-run/metadata/") for k in written)
    assert any(k.startswith("secret-run/failures/") for k in written)
    assert ray_logs, "the subprocess's Ray wrote no logs where expected"
    assert [k for k, data in written.items() if k.startswith("secret-run/images/") and b"c2pa" in data]  # signed
    for secret in (ENV_SECRET, OPTION_SECRET, signer.key_body):
        assert secret not in result.stdout and secret not in result.stderr
        assert not [k for k, data in written.items() if secret.encode() in data]
        assert not [k for k, data in ray_logs.items() if secret.encode() in data]
