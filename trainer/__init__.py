"""retina-trainer: train CNN models of retinal ganglion cell responses, logged to MLflow."""

__version__ = "0.2.0"
