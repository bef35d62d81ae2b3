"""MLflow "models from code" entry: the detector pyfunc is defined by code, not a pickle.

``tracking.log_detector`` logs this file as the model's ``python_model``; MLflow runs it on
load, and the weights come from the ``detector`` artifact (loaded with weights_only=True).
"""

from mlflow.models import set_model

from oodlab.track.tracking import DetectorModel

set_model(DetectorModel())
