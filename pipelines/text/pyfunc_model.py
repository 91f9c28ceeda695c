"""The text pyfunc as an MLflow "model from code": :func:`pipelines.text.registry.register_text` logs this
file (``mlflow.pyfunc.log_model(python_model=<this path>)``) instead of a pickled instance; MLflow runs
it where the version is loaded, and ``set_model`` names the model it serves."""

import mlflow.models

from latentforge.pipelines.text.registry import TextDecodeModel

mlflow.models.set_model(TextDecodeModel())
