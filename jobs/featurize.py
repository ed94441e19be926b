"""spark-submit jobs/featurize.py [--profile P] [key=value ...]: a frozen backbone over a dataset -> a features dataset."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("featurize")()
