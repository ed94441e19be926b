"""spark-submit jobs/plan.py [--profile P] [key=value ...]: predict training time and cost over N ranks."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("plan")()
