"""The Ray Serve application over ONNX Runtime: ``app`` (deployments + FastAPI ingress, the builder that
``config.yaml`` names), ``model_store`` (registry polling, downloads, version swaps), ``batching`` (graph
calls of concurrent requests as one ONNX Runtime call), ``operations`` (what each endpoint computes),
``errors`` (JSON error bodies, the request body limit), ``schemas`` (requests, responses, limits),
``codec`` (images in and out), ``launch`` (``latentforge serve``), ``demo`` (every endpoint called once).
The inference itself is :mod:`latentforge.runtime` (torch-free).
"""
