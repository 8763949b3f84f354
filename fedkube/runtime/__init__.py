"""Local runtime: runs a job's rendered pods as local processes."""
