"""spark-submit jobs/select_models.py [--profile P] [key=value ...]: train many configurations at once
(model hopper parallelism, task parallelism or Horovod), one MLflow parent run, the winner registered."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("select_models")()
