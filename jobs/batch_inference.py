"""spark-submit jobs/batch_inference.py [--profile P] [key=value ...]: score new inputs with a registry model."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("batch_inference")()
