"""The router's public endpoints serve TLS with the certificate in its config; the openai SDK trusts it
through a CA made in the test. The router reaches its worker with the cluster secret."""

from __future__ import annotations

import asyncio
import threading

import grpc
import httpx
import openai
import pytest

from decode_worker.worker import DecodeWorker
from protos import generate_pb2_grpc
from protos.cluster_auth import ClusterAuth
from router.config import RouterConfig
from router.server import Router, new_event_loop
from tests.worker_server.certs import TestCA
from tests.worker_server.test_security import SECRET, engine_config


@pytest.fixture
def tls_router(tiny, tmp_path):
    ca = TestCA(tmp_path)
    issued = ca.issue("router")
    worker = DecodeWorker(engine_config(tiny), auth=ClusterAuth(secret=SECRET))
    worker.start()
    config = RouterConfig(
        decode_addresses=(worker.address,),
        port=0,
        grpc_port=0,
        cluster_secret=SECRET,
        tls_certfile=issued.cert,
        tls_keyfile=issued.key,
        health_interval_s=0.2,
    )
    loop = new_event_loop()  # the router process's own kind of loop
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = Router(config)
    asyncio.run_coroutine_threadsafe(router.start(), loop).result(30)
    assert asyncio.run_coroutine_threadsafe(router.wait_ready(), loop).result(60)
    yield router, ca
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    worker.stop()


def test_the_openai_sdk_talks_https_to_the_router(tls_router):
    router, ca = tls_router
    assert router.urls["http"].startswith("https://")
    client = openai.OpenAI(
        base_url=f"{router.urls['http']}/v1", api_key="none", http_client=httpx.Client(verify=ca.path)
    )
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3
    with pytest.raises(openai.APIConnectionError):  # a client that does not trust the CA is refused
        openai.OpenAI(base_url=f"{router.urls['http']}/v1", api_key="none", max_retries=0).models.list()
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nothing
        httpx.get(f"http://127.0.0.1:{router.http_port}/health", timeout=5)


def test_the_public_grpc_endpoint_serves_tls(tls_router):
    router, ca = tls_router
    credentials = grpc.ssl_channel_credentials(root_certificates=open(ca.path, "rb").read())
    with grpc.secure_channel(f"127.0.0.1:{router.grpc_port}", credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        assert generate_pb2_grpc.GenerateStub(channel) is not None
    with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)
