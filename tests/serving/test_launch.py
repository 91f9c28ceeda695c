"""The private Serve calls that serving/launch.py deploys a config with (no public Python API does:
see the comment in ``deploy``) still exist with the arguments it passes, in the installed Ray."""

from __future__ import annotations

import inspect


def test_the_private_serve_calls_launch_uses_keep_their_signatures():
    from ray.serve._private.api import serve_start
    from ray.serve._private.client import ServeControllerClient

    start = inspect.signature(serve_start).parameters
    assert {"http_options", "proxy_location"} <= set(start), list(start)
    deploy = inspect.signature(ServeControllerClient.deploy_apps).parameters
    assert list(deploy)[:2] == ["self", "config"] and "_blocking" in deploy, list(deploy)
    # serve_start's result is what deploy() calls deploy_apps on.
    assert inspect.signature(serve_start).return_annotation in (ServeControllerClient, "ServeControllerClient")
