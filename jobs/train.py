"""spark-submit jobs/train.py [--profile P] [key=value ...]: Horovod-on-Spark training of a dataset version."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("train")()
