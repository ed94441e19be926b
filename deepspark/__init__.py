"""DeepSpark: deep learning on Spark, end to end (ETL -> Horovod training -> MLflow -> batch inference)."""

__version__ = "0.1.0"
