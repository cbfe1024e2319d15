"""The job kinds the benchmark's worker processes run (`--import bench_handlers`)."""

import claude_jobs


@claude_jobs.handler("noop")
def noop(job: claude_jobs.Job) -> None:
    """Does nothing: what is left is the queue's own cost."""
