"""spark-submit jobs/etl_images.py [key=value ...]: the ETL job under its first name (jobs/etl.py; modality
defaults to image), kept so existing commands and schedules keep working."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("etl")()
