"""The image pyfunc as an MLflow "model from code": :func:`pipelines.registry.register` logs this file
(``mlflow.pyfunc.log_model(python_model=<this path>)``) instead of a pickled instance.

MLflow runs the file where the version is loaded (``mlflow.pyfunc.load_model``); ``set_model`` names the
model it serves. The export format the version was registered with comes in through the model config
(``format_version``), which :meth:`OnnxAutoencoderModel.load_context` checks against the export.
"""

import mlflow.models

from latentforge.pipelines.registry import OnnxAutoencoderModel

mlflow.models.set_model(OnnxAutoencoderModel())
