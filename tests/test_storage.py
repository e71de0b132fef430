"""Storage access retries transient faults everywhere: through `Storage`, no call site can forget.

botocore and s3fs retry a throttle or a 500 a few times themselves; fluxbatch's own retries are what is left when
theirs run out. These tests turn theirs off (`ONE_TRY`) and put a proxy in front of moto that fails
chosen requests once each: code that retries gets through, code that does not fails, every time.
"""

from __future__ import annotations

import pytest

from flux_worker.storage import Storage, filesystem
from jobs.catalog import run_catalog
from jobs.synthesize import synthesize
from tests import test_catalog, test_synthesize
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the driver's storage calls; the model does not matter

# botocore's own retries down to one try; s3fs retries a throttle (SlowDown) itself, but not a 500 InternalError.
ONE_TRY = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def test_every_storage_operation_retries_a_fault_the_store_returns_once(s3_env, bucket, tmp_path, monkeypatch):
    local = tmp_path / "local.bin"
    local.write_bytes(b"from disk")
    with FaultProxy(s3_env, failure_rate=0, faults=("internal",), fail_once=lambda *_: True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store, root = filesystem(f"s3://{bucket}/run", ONE_TRY)
        assert isinstance(store, Storage)
        store.write_bytes(f"{root}/a/one.txt", b"one")
        store.put_file(str(local), f"{root}/a/two.bin")
        assert store.read_bytes(f"{root}/a/one.txt") == b"one"
        assert store.exists(f"{root}/a/one.txt") and not store.exists(f"{root}/a/none.txt")
        assert store.isdir(f"{root}/a")
        assert store.info(f"{root}/a/two.bin", refresh=True)["size"] == len(b"from disk")
        assert sorted(store.ls(f"{root}/a")) == [f"{root}/a/one.txt", f"{root}/a/two.bin"]
        assert sorted(store.find(root)) == [f"{root}/a/one.txt", f"{root}/a/two.bin"]
        assert sorted(store.glob(f"{root}/a/*.txt")) == [f"{root}/a/one.txt"]
        store.copy(f"{root}/a/one.txt", f"{root}/b/one.txt")
        store.mv(f"{root}/a/two.bin", f"{root}/b/two.bin")
        store.rm_file(f"{root}/a/one.txt")
        assert sorted(store.find(root)) == [f"{root}/b/one.txt", f"{root}/b/two.bin"]
    assert sum(proxy.faults.values()) >= 12, proxy.faults


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_packing_again_on_s3_retries_a_fault_on_the_shards(tiny_model, s3_env, bucket, monkeypatch):
    out = f"s3://{bucket}/synth"
    synthesize(test_synthesize.make_spec(out, str(tiny_model), prompts=3, layout="webdataset"), progress=False)
    with FaultProxy(s3_env, failure_rate=0, faults=("internal",),
                    fail_once=lambda _, path: "/synth/webdataset/" in path) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        spec = test_synthesize.make_spec(out, str(tiny_model), prompts=3,
                                         output={"uri": out, "layout": "webdataset", "storage_options": ONE_TRY})
        _, summary = synthesize(spec, progress=False)

    assert proxy.faults["internal"] >= 3, proxy.faults  # the shard's stats, the shard, the folder's listing
    assert summary is not None and (summary.images_rendered, summary.images_already_done) == (0, 3)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_catalog_rerun_on_s3_retries_a_fault_on_the_published_images(tmp_path, tiny_model, s3_env, bucket,
                                                                     monkeypatch):
    products = test_catalog.write_products(tmp_path / "p.parquet", test_catalog.PRODUCTS[:1])
    out = f"s3://{bucket}/cat"
    first, _ = run_catalog(test_catalog.make_spec(products, out, str(tiny_model), aspects=["1:1"]), progress=False)
    with FaultProxy(s3_env, failure_rate=0, faults=("internal",),
                    fail_once=lambda _, path: "/cat/catalog/" in path) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        spec = test_catalog.make_spec(products, out, str(tiny_model), aspects=["1:1"],
                                      output={"uri": out, "storage_options": ONE_TRY})
        again, summary = run_catalog(spec, progress=False)

    assert proxy.faults["internal"] >= 2, proxy.faults  # the index, the live image
    assert first.skus_new == ["LAMP-1"]
    assert (summary.images_rendered, again.skus_unchanged, again.skus_new, again.skus_changed) == (0, 1, [], [])


def test_a_store_that_keeps_failing_is_one_line_naming_the_url_not_a_traceback(s3_env, bucket):
    from flux_worker.storage import StoreFailingError

    with FaultProxy(s3_env, failure_rate=1.0, faults=("internal",)) as proxy:
        fs, root = filesystem(f"s3://{bucket}/run", {**ONE_TRY, "client_kwargs": {"endpoint_url": proxy.url}})
        store = Storage(fs.fs, tries=2)
        with pytest.raises(StoreFailingError) as failed:
            store.read_bytes(f"{root}/_job.json")

    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"read s3://{bucket}/run/_job.json failed 2 times")
    assert failed.value.exit_code == 1
