"""spark-submit jobs/etl_images.py [--profile P] [key=value ...]: raw images -> versioned Petastorm dataset."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("etl_images")()
