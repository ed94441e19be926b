"""spark-submit jobs/etl.py [--profile P] [key=value ...]: raw images, text or audio -> versioned Petastorm dataset."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("etl")()
