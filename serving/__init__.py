"""The Ray Serve application over ONNX Runtime: ``app`` (deployments + FastAPI ingress), ``runtime``
(torch-free ONNX Runtime inference), ``schemas`` (requests, responses, limits), ``codec`` (images in
and out).
"""
