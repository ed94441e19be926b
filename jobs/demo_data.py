"""python jobs/demo_data.py [key=value ...]: Fashion-MNIST (Debian package) -> raw PNG folder."""

from deepspark.cli import job_command

if __name__ == "__main__":
    job_command("demo_data")()
