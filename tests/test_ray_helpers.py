"""The Ray launcher's pure parts (no Ray needed): argv rewriting, bind address, resources, devices."""

from __future__ import annotations

import argparse

import pytest

from lumen.runtime.launcher_ray import (
    RayLauncher,
    cuda_device_for,
    forwarded_env,
    internal_host,
    model_paths,
    rewrite_worker_argv,
    worker_resources,
)
from lumen.runtime.server import add_serve_arguments


def test_worker_argv_gets_the_node_ip_and_its_gpu():
    argv = ["--worker-id", "3", "--host", "127.0.0.1", "--device", "cuda:3", "--deterministic"]
    out = rewrite_worker_argv(argv, "10.0.0.7", "cuda:0")
    assert out == ["--worker-id", "3", "--host", "10.0.0.7", "--device", "cuda:0", "--deterministic"]
    assert argv[3] == "127.0.0.1"  # the controller's list is not modified
    # CPU workers keep their device; a missing flag is added
    assert rewrite_worker_argv(["--device", "cpu"], "10.0.0.7", None) == ["--device", "cpu", "--host", "10.0.0.7"]
    with pytest.raises(ValueError):
        rewrite_worker_argv(["--host"], "10.0.0.7", None)


def test_model_paths_checked_on_each_node():
    argv = ["--model", "/models/qwen", "--worker-id", "0", "--draft-model", "/models/draft", "--host", "x"]
    assert model_paths(argv) == ["/models/qwen", "/models/draft"]
    assert model_paths(["--model"]) == []


def test_internal_sockets_bind_a_reachable_interface():
    # loopback or wildcard --host: the ROUTER binds (and advertises) the driver's node IP
    for host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        assert internal_host(host, "10.0.0.2") == "10.0.0.2"
    # an interface the operator chose is used as given
    assert internal_host("192.168.5.9", "10.0.0.2") == "192.168.5.9"


def test_worker_resources():
    assert worker_resources(on_gpu=True) == {"GPU": 1.0, "CPU": 1.0}
    assert worker_resources(on_gpu=False) == {"CPU": 1.0}
    assert worker_resources(False, '{"CPU": 0.5, "lumen_node_a": 1}') == {"CPU": 0.5, "lumen_node_a": 1.0}
    for bad in ('[1]', '{}', '{"CPU": -1}', '{"CPU": "x"}'):
        with pytest.raises(ValueError):
            worker_resources(False, bad)


def test_cuda_device_follows_ray_assignment():
    assert cuda_device_for([5], {"CUDA_VISIBLE_DEVICES": "5"}) == "cuda:0"  # Ray narrowed visibility
    assert cuda_device_for(["5"], {"CUDA_VISIBLE_DEVICES": "5"}) == "cuda:0"
    assert cuda_device_for([5], {}) == "cuda:5"  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    with pytest.raises(RuntimeError):
        cuda_device_for([], {})


def test_secret_and_api_key_are_never_forwarded_as_plain_env():
    env = {"LUMEN_CLUSTER_SECRET": "ab" * 32, "LUMEN_API_KEY": "k", "LUMEN_WORKER_THREADS": "2",
           "LUMEN_FAULT_SLOW_RELOAD_S": "1", "PATH": "/bin"}
    assert forwarded_env(env) == {"LUMEN_WORKER_THREADS": "2", "LUMEN_FAULT_SLOW_RELOAD_S": "1"}


def test_launcher_arguments():
    with pytest.raises(ValueError):
        RayLauncher(strategy="STRICT_RANDOM")
    with pytest.raises(ValueError, match="Ray Client"):
        RayLauncher(address="ray://head:10001")
    assert RayLauncher(strategy="pack").strategy == "PACK"
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--launcher", "ray", "--ray-address", "auto", "--placement-strategy", "PACK"])
    assert (args.launcher, args.ray_address, args.placement_strategy) == ("ray", "auto", "PACK")
    assert p.parse_args([]).launcher == "local"
